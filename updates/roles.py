"""The operator groups of the manual, kept true in code.

``update`` runs updates, removes update locks, accepts and revokes node keys and
sends hotfix notices;
``maint`` ends maintenance mode. Both may look at the fleet, its runs and the audit trail.
Applied after every ``migrate`` (post_migrate, like Django's own permissions):
permissions are only ever added, so grants made by hand survive.
"""

from __future__ import annotations

from typing import Any

VIEW = [
    "nodes.view_cluster", "nodes.view_node", "nodes.view_nodekey", "updates.view_release", "updates.view_package",
    "updates.view_updaterun", "updates.view_updatestep", "updates.view_updatelock",
    "updates.view_maintenancenotice", "updates.view_rollout", "hotfixes.view_contact", "hotfixes.view_hotfixnotice",
    "hotfixes.view_delivery", "auditlog.view_logentry",
]  # fmt: skip
ROLES = {
    "update": [
        "nodes.start_update",
        "nodes.remove_update_lock",
        "nodes.manage_node_keys",
        "hotfixes.send_hotfixnotice",
        *VIEW,
    ],
    "maint": ["nodes.end_maintenance", *VIEW],
}


def sync_roles(**kwargs: Any) -> None:
    from django.contrib.auth.models import Group, Permission
    from django.db.models import Q

    for name, perms in ROLES.items():
        group, _ = Group.objects.get_or_create(name=name)
        wanted = Q(pk__in=[])
        for perm in perms:
            app_label, codename = perm.split(".")
            wanted |= Q(content_type__app_label=app_label, codename=codename)
        group.permissions.add(*Permission.objects.filter(wanted))
