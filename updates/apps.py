from django.apps import AppConfig


class UpdatesConfig(AppConfig):
    name = "updates"
    verbose_name = "Updates"

    def ready(self) -> None:
        from updates import checks  # noqa: F401  (registers system checks)
