"""Operator actions on nodes, shared by the admin and the management commands."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from celery import signature
from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet

from agent.shared.protocol import END_MAINTENANCE, NoticeCommand
from audit.records import Operation, record, record_each
from nodes.models import Cluster, Node
from updates import announced, trust
from updates.models import MaintenanceNotice, Release, UpdateRun
from updates.notices import send_notice
from updates.runs.cluster_cap import cluster_slots, release_slot, wake_waiters
from updates.runs.locks import remove_lock as remove_update_lock
from updates.runs.start import StartChecks, UpdateRefused, check_can_start, start_update, start_updates


@dataclass
class UpdatePlan:
    node: Node
    release: Release | None
    users: list[str] = field(default_factory=list)
    refusal: str = ""


def plan_updates(nodes: list[Node]) -> list[UpdatePlan]:
    """What an Auto-Update of each node would do, for the confirmation page: the
    same few queries for a whole cluster as for one node."""
    checks = StartChecks.read(nodes)
    plans = []
    for node in nodes:
        release = checks.newest.get(node.channel)
        plan = UpdatePlan(node=node, release=release, users=list(node.logged_in_users))
        if release is None:
            plan.refusal = f"No {node.channel} release is known: run `manage.py sync_releases`."
        else:
            try:
                check_can_start(node, release, UpdateRun.Trigger.MANUAL, checks=checks)
            except UpdateRefused as exc:
                plan.refusal = str(exc)
        plans.append(plan)
    return plans


def oldstable_release() -> Release | None:
    return Release.newest(Release.Channel.OLDSTABLE)


def start_catchup(node: Node, user: Any, packages: list[str] | None = None) -> UpdateRun:
    """Catch up on an omitted update from Oldstable: the whole release, or only
    the chosen packages. Raises UpdateRefused with the reason."""
    release = oldstable_release()
    if release is None:
        raise UpdateRefused("No oldstable release is known: run `manage.py sync_releases`.")
    trigger = UpdateRun.Trigger.CATCHUP_PARTIAL if packages else UpdateRun.Trigger.CATCHUP_FULL
    with transaction.atomic():  # the run and its audit row, or neither
        run = start_update(node, release, user=user, trigger=trigger, packages=packages)
        record(Operation.CATCHUP, run, user=user, release=release.version, packages=run.packages)
    return run


def start_planned(plans: list[UpdatePlan], user: Any) -> tuple[list[UpdateRun], list[str]]:
    """Start the confirmed plans in one go. A node whose situation changed since the
    confirmation (locked, updating, updated) is refused with its reason."""
    refused = [plan.refusal for plan in plans if plan.release is None]
    targets = [(plan.node, plan.release) for plan in plans if plan.release is not None]
    if not targets:
        return [], refused  # no transaction: on SQLite it would take the write lock for nothing
    with transaction.atomic():  # the runs and their audit rows, or neither
        runs, more = start_updates(targets, user=user)
        record_each(Operation.START_UPDATE, [(run, {"release": run.release.version}) for run in runs], user=user)
    return runs, refused + more


def remove_lock(node: Node, user: Any) -> bool:
    return remove_update_lock(node, user)


def end_maintenance(node: Node, user: Any = None) -> bool:
    """End maintenance mode (group ``maint``): logon on, back into the load balancer.
    Refused while the node is updating. The operator's action, in the audit trail."""
    with transaction.atomic():
        ended = leave_maintenance(node)
        if ended:
            record(Operation.END_MAINTENANCE, node, user=user)
    return ended


def leave_maintenance(node: Node) -> bool:
    """end_maintenance without an audit row of its own: part of another action (a run
    called off because an operator left its node out of a plan: that is the row)."""
    with transaction.atomic():
        if UpdateRun.objects.running().filter(node=node).exists():
            return False
        changed = Node.objects.filter(pk=node.pk, maintenance_mode=True).update(
            maintenance_mode=False, maintenance_reason=""
        )
        if changed:
            command = trust.command("end_maintenance", NoticeCommand(node=node.hostname).to_wire())
            sig = signature(END_MAINTENANCE, args=(command,)).set(queue=node.queue)
            transaction.on_commit(sig.apply_async)
            if node.cluster_id:
                # A failed cluster node kept its update slot while out of service; now it is back.
                transaction.on_commit(partial(release_slot, node))
    return bool(changed)


def force_release_slot(cluster: Cluster, hostname: str, user: Any = None) -> bool:
    """Free the update slot of a holder that is gone (it would otherwise stay taken for
    good) and let the next waiter go on. False if that node held none."""
    if not cluster_slots().force_release(cluster.name, hostname):
        return False
    record(Operation.RELEASE_SLOT, cluster, user=user, node=hostname)
    wake_waiters(cluster)
    return True


def notice_lead() -> float:
    return settings.TGP_MAINTENANCE_NOTICE_LEAD


def announce(nodes: list[Node], message: str, starts_at: datetime, user: Any) -> int:
    """Send a maintenance notice to the users logged in on each node, ahead of time."""
    with transaction.atomic():
        notices = []
        for node in nodes:
            notice = MaintenanceNotice.objects.create(
                node=node, message=message, starts_at=starts_at, created_by=user if getattr(user, "pk", None) else None
            )
            # The agent writes the time in the appliance's own zone (render_notice).
            send_notice(node, f"notice-{notice.pk}", message, starts_at)
            notices.append((notice, {"starts_at": starts_at}))
        record_each(Operation.ANNOUNCE_MAINTENANCE, notices, user=user)
    return len(nodes)


def announce_planned(
    plans: list[UpdatePlan], starts_at: datetime, user: Any, message: str = ""
) -> tuple[list[MaintenanceNotice], list[str]]:
    """Announce now the confirmed plans' updates for `starts_at` ("announce now, update at"):
    UpdateRefused for a bad time, else the notices and the refusals."""
    announced.check_update_time(starts_at)
    refused = [plan.refusal for plan in plans if plan.release is None]
    targets = [(plan.node, plan.release) for plan in plans if plan.release is not None]
    notices, more = announced.announce_updates(targets, starts_at, user, message)
    return notices, refused + more


def recent_runs(node_id: Any) -> QuerySet[UpdateRun]:
    return UpdateRun.objects.filter(node_id=node_id).select_related("release", "started_by")[:10]
