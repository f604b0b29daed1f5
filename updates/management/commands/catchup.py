from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from audit.context import AuditedCommand
from nodes import services
from nodes.models import Node
from updates.cli import wait_for_run
from updates.runs.start import UpdateRefused


class Command(AuditedCommand):  # recorded with the OS user who ran it
    help = "Catch up on an omitted update from Oldstable: --full, or --packages NAME[,NAME...]."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("node")
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--full", action="store_true", help="the whole oldstable release")
        group.add_argument("--packages", help="comma-separated package names of the oldstable release")
        parser.add_argument("--yes", action="store_true", help="confirm that logged-in users will be logged off")
        parser.add_argument("--wait", action="store_true", help="wait for the run to end; exit 1 if it fails")
        parser.add_argument("--timeout", type=float, default=3600.0)

    def handle(self, *args: Any, node: str, full: bool, packages: str | None, **options: Any) -> None:
        target = Node.objects.filter(hostname=node).first()
        if target is None:
            raise CommandError(f"no node named {node!r}")
        if not options["yes"]:
            users = ", ".join(target.logged_in_users) or "nobody"
            raise CommandError(f"{node}: these users will be logged off: {users}. Repeat with --yes to go ahead.")
        names = [] if full else [p.strip() for p in (packages or "").split(",") if p.strip()]
        try:
            run = services.start_catchup(target, None, names)
        except UpdateRefused as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"run {run.pk}: {run.get_trigger_display()} of {node} to {run.release.version}")
        if options["wait"]:
            wait_for_run(run.pk, options["timeout"], self.stdout)
