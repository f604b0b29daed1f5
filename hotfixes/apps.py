from django.apps import AppConfig


class HotfixesConfig(AppConfig):
    name = "hotfixes"
    verbose_name = "Hotfix notices"

    def ready(self) -> None:
        from hotfixes import checks, phone  # noqa: F401  (registers system checks)

        phone.install_log_scrubber()
