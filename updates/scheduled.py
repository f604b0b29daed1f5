"""What happens when a schedule's beat entries fire: one task per entry, fanning
out to the schedule's nodes. Safe to fire twice (a second beat): a run for the
same node and update time is never started twice."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db import IntegrityError
from django.utils import timezone

from nodes.models import Node
from updates.models import Release, UpdateRun, UpdateSchedule
from updates.plans import ensure_plan
from updates.releases import sync_from_url
from updates.repository import RepositoryError
from updates.runs.chains import start_update_phase
from updates.runs.start import UpdateRefused, start_update
from updates.schedules import Cron, update_entry_lead, zone

log = logging.getLogger(__name__)
# How late an entry may fire and still belong to its update time.
LATE_FIRE = timedelta(hours=6)


def update_time_for(schedule: UpdateSchedule, kind: str, now: datetime) -> datetime | None:
    """The update time ("slot") an entry that fires now belongs to."""
    if schedule.run_at:
        return schedule.run_at
    lead = schedule.download_lead if kind == "download" else update_entry_lead(schedule)
    fired_for = (
        Cron.parse(schedule.download_cron or schedule.cron) if kind == "download" and schedule.download_cron else None
    )
    cron = Cron.parse(schedule.cron)
    if fired_for is not None:  # an explicit download window: the next update after it
        return cron.next_after(now, zone(schedule.timezone))
    # The entry fired `lead` before an update time: find that update time.
    return cron.last_at_or_before(now + lead + timedelta(seconds=59), zone(schedule.timezone), LATE_FIRE + lead)


def refresh_releases() -> str:
    try:
        index = sync_from_url(only_if_newer=True)
    except (RepositoryError, OSError) as exc:
        log.warning("repository not reachable, using the releases known: %s", exc)
        return f"repository not reachable ({exc}); "
    return f"index serial {index.serial}; "


def updates_for(node: Node) -> Release | None:
    newest = Release.newest(node.channel)
    if newest is None or newest.version == node.installed_version:
        return None
    return newest


def start_for(schedule: UpdateSchedule, node: Node, slot: datetime, kind: str = "update") -> str:
    existing = UpdateRun.objects.filter(node=node, scheduled_for=slot).first()
    if existing:
        # The update entry arms a timer for a node whose own time comes later (a plan's later wave).
        start_update_phase(existing.pk, arm=kind == "update")
        return f"{node}: run {existing.pk}"
    release = updates_for(node)
    if release is None:
        return f"{node}: no updates available"
    try:
        run = start_update(node, release, trigger=UpdateRun.Trigger.SCHEDULED, schedule=schedule, scheduled_for=slot)
    except UpdateRefused as exc:
        return f"{node}: not started: {exc}"
    except IntegrityError:
        return f"{node}: already started for {slot:%Y-%m-%d %H:%M}"
    if kind == "update":
        start_update_phase(run.pk, arm=True)  # downloads first, then waits for its own time
    return f"{node}: run {run.pk} to {release.version}"


def fire(schedule_id: int, kind: str) -> str:
    """The download or update entry of a schedule fired: check for updates and
    start (or carry on) a run per node. Returns the logged result."""
    schedule = UpdateSchedule.objects.select_related("cluster", "node").filter(pk=schedule_id).first()
    if schedule is None or not schedule.time_control:
        return "time control is off"
    now = timezone.now()
    slot = update_time_for(schedule, kind, now)
    if slot is None:
        return "no update time found for this firing"
    result = refresh_releases()
    nodes = schedule.target_nodes().select_related("cluster")
    if schedule.cluster_id:
        # Each node's own time, planned once for the occurrence; left-out nodes get no run.
        plan = ensure_plan(schedule, slot)
        nodes = nodes.filter(plan_entries__plan=plan, plan_entries__excluded=False)
    lines = [start_for(schedule, node, slot, kind) for node in nodes]
    result += f"{kind} for {timezone.localtime(slot):%Y-%m-%d %H:%M}: " + "; ".join(lines or ["no nodes"])
    UpdateSchedule.objects.filter(pk=schedule_id).update(last_checked_at=now, last_result=result[:4000])
    log.info("schedule %s: %s", schedule_id, result)
    return result
