from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from nodes.models import Node
from nodes.services import plan_update
from updates import workflow
from updates.cli import wait_for_run


class Command(BaseCommand):
    help = "Auto-Update one node to the newest release of its channel (logs its users off)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("node", help="host name of the node")
        parser.add_argument("--yes", action="store_true", help="confirm that logged-in users will be logged off")
        parser.add_argument("--wait", action="store_true", help="wait for the run to end; exit 1 if it fails")
        parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait with --wait")

    def handle(self, *args: Any, node: str, yes: bool, wait: bool, timeout: float, **options: Any) -> None:
        target = Node.objects.filter(hostname=node).first()
        if target is None:
            raise CommandError(f"no node named {node!r}")
        plan = plan_update(target)
        if plan.refusal or plan.release is None:
            raise CommandError(plan.refusal)
        users = ", ".join(plan.users) or "nobody"
        if not yes:
            raise CommandError(f"{node}: these users will be logged off: {users}. Repeat with --yes to go ahead.")
        try:
            run = workflow.start_update(target, plan.release)
        except workflow.UpdateRefused as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            f"run {run.pk}: {node} {target.installed_version or '?'} -> {plan.release.version}; logging off: {users}"
        )
        if wait:
            wait_for_run(run.pk, timeout, self.stdout)
