"""The two operator groups of the manual: ``update`` runs updates and removes
update locks, ``maint`` ends maintenance mode. Both may look at everything."""

from django.db import migrations

VIEW = [
    ("nodes", "cluster"), ("nodes", "node"), ("updates", "release"), ("updates", "package"),
    ("updates", "updaterun"), ("updates", "updatestep"), ("updates", "updatelock"), ("updates", "maintenancenotice"),
]  # fmt: skip
ROLES = {
    "update": ["start_update", "remove_update_lock"],
    "maint": ["end_maintenance"],
}


def create_groups(apps, schema_editor):
    from django.contrib.auth.management import create_permissions

    # Permissions are normally created after migrate; the groups need them now.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    view = [Permission.objects.get(content_type__app_label=a, codename=f"view_{m}") for a, m in VIEW]
    for name, codenames in ROLES.items():
        group, _ = Group.objects.get_or_create(name=name)
        own = Permission.objects.filter(content_type__app_label="nodes", codename__in=codenames)
        group.permissions.add(*view, *own)


def remove_groups(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=ROLES).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("updates", "0001_initial"),
        ("nodes", "0001_initial"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]
    operations = [migrations.RunPython(create_groups, remove_groups)]
