from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from audit.context import AuditedCommand
from nodes.models import Cluster, Node
from nodes.services import UpdatePlan, announce_planned, plan_updates, start_planned
from updates.cli import parse_update_time, wait_for_runs
from updates.runs.start import UpdateRefused


class Command(AuditedCommand):  # recorded with the OS user who ran it
    help = (
        "Auto-Update nodes to the newest release of their channel (logs their users off): "
        "the nodes named, and with --cluster every node of a cluster, started at once within its cap. "
        "With --at or --in: announce it now and update then (the manual: about 2 hours ahead)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("nodes", nargs="*", metavar="node", help="host name of a node")
        parser.add_argument("--cluster", help="every node of this cluster, besides the nodes named")
        parser.add_argument("--yes", action="store_true", help="confirm that logged-in users will be logged off")
        parser.add_argument("--wait", action="store_true", help="wait for the runs to end; exit 1 if one fails")
        parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait with --wait, for all runs")
        when = parser.add_mutually_exclusive_group()
        when.add_argument(
            "--at", metavar="ISO-TIME", help="announce now, update at this time (e.g. 2026-12-06T03:00; local time "
            "of the control plane unless it names its offset)",
        )  # fmt: skip
        when.add_argument("--in", dest="in_", metavar="DURATION", help="announce now, update in e.g. 2h, 90m, 1h30m")
        parser.add_argument("--message", default="", help="the notice for --at/--in; {when} becomes the time")

    def handle(self, *args: Any, nodes: list[str], cluster: str | None, yes: bool, wait: bool, timeout: float,
               at: str | None, in_: str | None, message: str, **options: Any) -> None:  # fmt: skip
        if not timeout > 0:
            raise CommandError(f"--timeout must be a positive number of seconds, not {timeout}")
        update_at = parse_update_time(at, in_) if at or in_ else None
        if update_at is not None and wait:
            raise CommandError("--wait follows runs that start now; an announced update starts at its time")
        plans = plan_updates(self.targets(nodes, cluster))
        startable = [plan for plan in plans if plan.release and not plan.refusal]
        refused = [plan.refusal for plan in plans if plan.refusal]
        if not startable:
            raise CommandError("\n".join(refused))
        if not yes:
            who = "; ".join(f"{plan.node}: {logged_off(plan)}" for plan in startable)
            raise CommandError(f"these users will be logged off: {who}. Repeat with --yes to go ahead.")
        if update_at is not None:
            self.announce(startable, update_at, message, refused, len(plans))
            return
        runs, more = start_planned(startable, user=None)
        users = {plan.node.pk: logged_off(plan) for plan in startable}
        for run in runs:
            before = run.version_before or "?"
            self.stdout.write(
                f"run {run.pk}: {run.node} {before} -> {run.release.version}; logging off: {users[run.node_id]}"
            )
        refused += more
        for reason in refused:
            self.stderr.write(f"not started: {reason}")
        if wait and runs:
            wait_for_runs([run.pk for run in runs], timeout, self.stdout)
        if refused:
            raise CommandError(f"{len(refused)} of {len(plans)} node(s) not started")

    def announce(
        self, startable: list[UpdatePlan], update_at: datetime, message: str, refused: list[str], planned: int
    ) -> None:
        try:
            notices, more = announce_planned(startable, update_at, user=None, message=message)
        except UpdateRefused as exc:
            raise CommandError(str(exc)) from None
        when = f"{timezone.localtime(update_at):%Y-%m-%d %H:%M %Z}"
        users = {plan.node.pk: logged_off(plan) for plan in startable}
        for notice in notices:
            assert notice.node is not None and notice.release is not None
            self.stdout.write(
                f"notice {notice.pk}: {notice.node} -> {notice.release.version} at {when}; told now: "
                f"{users[notice.node.pk]}"
            )
        refused += more
        for reason in refused:
            self.stderr.write(f"not announced: {reason}")
        if refused:
            raise CommandError(f"{len(refused)} of {planned} node(s) not announced")

    @staticmethod
    def targets(names: list[str], cluster: str | None) -> list[Node]:
        if not names and not cluster:
            raise CommandError("name at least one node, or a cluster with --cluster")
        found = {node.hostname: node for node in Node.objects.filter(hostname__in=names).select_related("cluster")}
        unknown = [name for name in names if name not in found]
        if unknown:
            raise CommandError(", ".join(f"no node named {name!r}" for name in unknown))
        chosen = [found[name] for name in dict.fromkeys(names)]
        if cluster:
            if not Cluster.objects.filter(name=cluster).exists():
                raise CommandError(f"no cluster named {cluster!r}")
            members = Node.objects.filter(cluster__name=cluster).select_related("cluster").order_by("hostname")
            chosen += [node for node in members if node.hostname not in found]
        if not chosen:
            raise CommandError(f"cluster {cluster!r} has no nodes")
        return chosen


def logged_off(plan: UpdatePlan) -> str:
    return ", ".join(plan.users) or "nobody"
