from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class TgpadminConfig(AppConfig):
    name = "tgpadmin"


class AdminConfig(admin_apps.AdminConfig):
    """django.contrib.admin with our site (INSTALLED_APPS names this class): its home
    page is the fleet overview. default = False: not the config of the tgpadmin app."""

    default = False
    default_site = "tgpadmin.sites.AdminSite"
