"""What happens when a schedule's beat entries fire: one task per entry, fanning
out to the schedule's nodes. Safe to fire twice (a second beat, a re-armed lost
firing): a run for the same node and update time is never started twice.

A firing re-arms its entry for the next one (updates.schedules.arm), then acts:
- the update entry starts (or carries on) the run of its update;
- the download entry does so only if it is the last download before that update;
  an earlier one, and every firing of a download-only schedule, only downloads
  the newest release onto the node (a run with trigger `download`: no maintenance
  mode, no notice).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from agent.shared.repository import RepositoryError
from nodes.models import Node
from updates.models import Release, UpdateRun, UpdateSchedule
from updates.plans import ensure_plan
from updates.releases import sync_from_url
from updates.runs.chains import start_update_phase
from updates.runs.start import UpdateRefused, start_update
from updates.schedules import LATE_FIRE, Firing, arm, armed_at, next_firing, starts_run

log = logging.getLogger(__name__)


def firing_for(schedule: UpdateSchedule, kind: str, at: datetime | None, now: datetime) -> Firing | None:
    """The firing an entry that fires now stands for: the one at `at` (the entry's
    kwargs) if the schedule still has it, else (a direct call) a one-off schedule's
    own, or a recurring one's latest at or before now, within LATE_FIRE."""
    if at is not None:
        firing = next_firing(schedule, kind, at - timedelta(microseconds=1))
        return firing if firing and firing.at == at else None
    if schedule.run_at:
        return next_firing(schedule, kind, now - timedelta(days=3660))
    found, firing = None, next_firing(schedule, kind, now - LATE_FIRE)
    while firing and firing.at <= now + timedelta(seconds=59):
        found, firing = firing, next_firing(schedule, kind, firing.at)
    return found


def rearm_after(schedule: UpdateSchedule, firing: Firing, now: datetime) -> None:
    """Arm the entry for the firing after this one, unless it is armed for a later one
    already (a duplicate or late firing moves nothing back)."""
    with transaction.atomic():
        locked = UpdateSchedule.objects.select_for_update(of=("self",)).select_related("cluster").get(pk=schedule.pk)
        current = armed_at(getattr(locked, f"{firing.kind}_task"))
        if current is None or current <= firing.at:
            arm(locked, firing.kind, max(firing.at, now - LATE_FIRE))


def refresh_releases() -> str:
    try:
        index = sync_from_url(only_if_newer=True)
    except (RepositoryError, OSError) as exc:
        log.warning("repository not reachable, using the releases known: %s", exc)
        return f"repository not reachable ({exc}); "
    return f"targets version {index.serial}; "


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


def download_for(schedule: UpdateSchedule, node: Node) -> str:
    """Download the newest release onto the node, nothing else: its verified files
    wait there for the update (or an Auto-Update), which then fetches none again."""
    release = updates_for(node)
    if release is None:
        return f"{node}: no updates available"
    try:
        run = start_update(node, release, trigger=UpdateRun.Trigger.DOWNLOAD, schedule=schedule)
    except UpdateRefused as exc:
        return f"{node}: not downloaded: {exc}"
    return f"{node}: download run {run.pk} of {release.version}"


def fire(schedule_id: int, kind: str, at: datetime | None = None) -> str:
    """The download or update entry of a schedule fired (for its firing at `at`):
    re-arm it, check for updates and start (or carry on) a run per node, or only
    download. Returns the logged result."""
    schedule = UpdateSchedule.objects.select_related("cluster", "node").filter(pk=schedule_id).first()
    if schedule is None or not schedule.time_control:
        return "time control is off"
    now = timezone.now()
    firing = firing_for(schedule, kind, at, now)
    if firing is None:
        if at is not None:  # armed before the schedule changed: arm it as it is now
            rearm_after(schedule, Firing(kind, at, None), now)
        return "no firing of this schedule at this time"
    rearm_after(schedule, firing, now)
    if now - firing.at > LATE_FIRE:
        return _log(schedule, now, f"{kind} of {firing.at:%Y-%m-%d %H:%M} missed (fired at {now:%Y-%m-%d %H:%M})")
    result = refresh_releases()
    nodes = schedule.target_nodes().select_related("cluster")
    if firing.update_at is not None and (kind == "update" or starts_run(schedule, firing)):
        if schedule.cluster_id:
            # Each node's own time, planned once for the occurrence; left-out nodes get no run.
            plan = ensure_plan(schedule, firing.update_at)
            nodes = nodes.filter(plan_entries__plan=plan, plan_entries__excluded=False)
        lines = [start_for(schedule, node, firing.update_at, kind) for node in nodes]
        result += f"{kind} for {timezone.localtime(firing.update_at):%Y-%m-%d %H:%M}: "
    else:
        lines = [download_for(schedule, node) for node in nodes]
        result += "download only: "
    return _log(schedule, now, result + "; ".join(lines or ["no nodes"]))


def _log(schedule: UpdateSchedule, now: datetime, result: str) -> str:
    UpdateSchedule.objects.filter(pk=schedule.pk).update(last_checked_at=now, last_result=result[:4000])
    log.info("schedule %s: %s", schedule.pk, result)
    return result
