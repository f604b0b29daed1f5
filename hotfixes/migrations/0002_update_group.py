"""The ``update`` group (updates/migrations/0002_roles.py) sends hotfix notices and
may look at contacts, notices and deliveries."""

from django.db import migrations

GROUP = "update"
CODENAMES = ["send_hotfixnotice", "view_contact", "view_hotfixnotice", "view_delivery"]


def grant(apps, schema_editor):
    from django.contrib.auth.management import create_permissions

    # Permissions are normally created after migrate; the group needs them now.
    app_config = apps.get_app_config("hotfixes")
    app_config.models_module = True
    create_permissions(app_config, apps=apps, verbosity=0)
    app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name=GROUP)
    group.permissions.add(*Permission.objects.filter(content_type__app_label="hotfixes", codename__in=CODENAMES))


def revoke(apps, schema_editor):
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    perms = Permission.objects.filter(content_type__app_label="hotfixes", codename__in=CODENAMES)
    for group in Group.objects.filter(name=GROUP):
        group.permissions.remove(*perms)


class Migration(migrations.Migration):
    dependencies = [
        ("hotfixes", "0001_initial"),
        ("updates", "0002_roles"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]
    operations = [migrations.RunPython(grant, revoke)]
