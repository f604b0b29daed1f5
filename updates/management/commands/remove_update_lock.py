from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError, CommandParser

from audit.context import AuditedCommand
from nodes.models import Node
from updates.runs.locks import remove_lock


class Command(AuditedCommand):  # recorded with the OS user who ran it
    help = "Remove the update lock of a node (kept as history)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("node")
        parser.add_argument("--user", default=None, help="user name to record as having removed it")

    def handle(self, *args: Any, node: str, user: str | None, **options: Any) -> None:
        target = Node.objects.filter(hostname=node).first()
        if target is None:
            raise CommandError(f"no node named {node!r}")
        who = None
        if user:
            who = get_user_model().objects.filter(username=user).first()
            if who is None:
                raise CommandError(f"no user named {user!r}")
            if not who.has_perm("nodes.remove_update_lock"):
                raise CommandError(f"{user} may not remove update locks (group 'update')")
        if not remove_lock(target, who):
            raise CommandError(f"{node} has no update lock")
        self.stdout.write(f"update lock of {node} removed")
