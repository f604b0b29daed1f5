from django.apps import AppConfig


class UpdatesConfig(AppConfig):
    name = "updates"
    verbose_name = "Updates"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from updates import checks  # noqa: F401  (registers system checks)
        from updates.roles import sync_roles

        # After Django has created the permissions; again after a test flush.
        post_migrate.connect(sync_roles, dispatch_uid="tgpadmin-sync-roles")
