"""What happens when a schedule's beat entries fire: one task per entry, fanning
out to all the schedule's nodes at once (a fixed number of queries, however many
nodes: start.start_scheduled, chains.start_update_phases). Safe to fire twice (a second beat, a re-armed lost
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
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agent.shared.repository import RepositoryError
from nodes.models import Node
from updates.models import Release, UpdateRun, UpdateSchedule
from updates.plans import ensure_plan
from updates.releases import sync_from_url
from updates.runs.chains import start_update_phases
from updates.runs.start import AlreadyStarted, UpdateRefused, start_scheduled
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
        rows = UpdateSchedule.objects.select_for_update(of=("self",))
        locked = rows.select_related("cluster", f"{firing.kind}_task__clocked").get(pk=schedule.pk)
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


@dataclass(frozen=True)
class _Look:
    """This process's last look at the repository (refresh_releases): which one, when it
    began, and what it found."""

    repository: tuple[str, str]  # URL and pinned root file
    began: datetime
    result: str


class _Looks:
    # Per process: a control worker's prefork child runs one task at a time, so the
    # last look needs no lock, and each process looks once per due instant.
    last: _Look | None = None


def releases_as_of(due: datetime) -> str:
    """refresh_releases, unless this process looked at the same repository at or after
    `due` already: a firing needs the releases as they were at its due time, and a look
    begun since shows them so, or newer. Firings due at the same instant (500 schedules
    at 03:00, the download entries of a fleet-wide update) share one look per control
    worker process instead of a TUF refresh (two GETs and the metadata's signatures) each;
    a firing due after the last look began looks again, so a release published or
    withdrawn before a firing's time is seen by it, as before. Sharing is safe because
    this index only decides which release a run is for: every node verifies everything
    again with TUF itself (its download refreshes the metadata and refuses a withdrawn
    release; install checks every file against the signed targets). A failed look is
    shared too: the firings due before it use the releases known, and a repository that
    hangs costs one timeout per due instant, not one per schedule."""
    repository = (str(settings.TGP_REPO_URL), str(settings.TGP_REPO_ROOT_FILE))
    last = _Looks.last
    if last is not None and last.repository == repository and last.began >= due:
        return last.result
    began = timezone.now()
    result = refresh_releases()
    _Looks.last = _Look(repository, began, result)
    return result


def updates_for(node: Node, newest: dict[str, Release | None] | None = None) -> Release | None:
    """The release a schedule would update the node to, if any. `newest`: the newest
    release per channel, read once for many nodes."""
    release = newest[node.channel] if newest is not None else Release.newest(node.channel)
    if release is None or release.version == node.installed_version:
        return None
    return release


def newest_releases(nodes: list[Node]) -> dict[str, Release | None]:
    return {channel: Release.newest(channel) for channel in {node.channel for node in nodes}}


def start_runs(schedule: UpdateSchedule, nodes: list[Node], slot: datetime, kind: str = "update") -> list[str]:
    """Start, or carry on, the run of each node for the update at `slot`, all nodes at
    once (start.start_scheduled, chains.start_update_phases): a fixed number of queries
    however many nodes. Returns a line per node, in order."""
    runs = UpdateRun.objects.filter(node__in=nodes, scheduled_for=slot).select_related("node__cluster", "release")
    existing = {run.node_id: run for run in runs}
    newest = newest_releases([node for node in nodes if node.pk not in existing])
    targets = [(node, release) for node in nodes if node.pk not in existing and (release := updates_for(node, newest))]
    outcomes = {
        node.pk: outcome
        for (node, _), outcome in zip(
            targets,
            start_scheduled(targets, trigger=UpdateRun.Trigger.SCHEDULED, schedule=schedule, scheduled_for=slot),
            strict=True,
        )
    }
    started = [outcome for outcome in outcomes.values() if isinstance(outcome, UpdateRun)]
    # The update entry arms a timer for a node whose own time comes later (a plan's later
    # wave); a run it starts downloads first, then waits for its own time.
    start_update_phases(list(existing.values()), arm=kind == "update")
    if kind == "update":
        start_update_phases(started, arm=True)
    lines = []
    for node in nodes:
        outcome = outcomes.get(node.pk)
        if node.pk in existing:
            lines.append(f"{node}: run {existing[node.pk].pk}")
        elif outcome is None:
            lines.append(f"{node}: no updates available")
        elif isinstance(outcome, AlreadyStarted):
            lines.append(f"{node}: already started for {slot:%Y-%m-%d %H:%M}")
        elif isinstance(outcome, UpdateRefused):
            lines.append(f"{node}: not started: {outcome}")
        else:
            lines.append(f"{node}: run {outcome.pk} to {outcome.release.version}")
    return lines


def download_runs(schedule: UpdateSchedule, nodes: list[Node]) -> list[str]:
    """Download the newest release onto each node, nothing else: its verified files
    wait there for the update (or an Auto-Update), which then fetches none again. All
    nodes at once; a line per node, in order."""
    newest = newest_releases(nodes)
    targets = [(node, release) for node in nodes if (release := updates_for(node, newest))]
    outcomes = dict(
        zip(
            [node.pk for node, _ in targets],
            start_scheduled(targets, trigger=UpdateRun.Trigger.DOWNLOAD, schedule=schedule),
            strict=True,
        )
    )
    lines = []
    for node in nodes:
        outcome = outcomes.get(node.pk)
        if outcome is None:
            lines.append(f"{node}: no updates available")
        elif isinstance(outcome, UpdateRefused):
            lines.append(f"{node}: not downloaded: {outcome}")
        else:
            lines.append(f"{node}: download run {outcome.pk} of {outcome.release.version}")
    return lines


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
    result = releases_as_of(firing.at)
    nodes = schedule.target_nodes().select_related("cluster")
    if firing.update_at is not None and (kind == "update" or starts_run(schedule, firing)):
        if schedule.cluster_id:
            # Each node's own time, planned once for the occurrence; left-out nodes get no run.
            plan = ensure_plan(schedule, firing.update_at)
            nodes = nodes.filter(plan_entries__plan=plan, plan_entries__excluded=False)
        lines = start_runs(schedule, list(nodes), firing.update_at, kind)
        result += f"{kind} for {timezone.localtime(firing.update_at):%Y-%m-%d %H:%M}: "
    else:
        lines = download_runs(schedule, list(nodes))
        result += "download only: "
    return _log(schedule, now, result + "; ".join(lines or ["no nodes"]))


def _log(schedule: UpdateSchedule, now: datetime, result: str) -> str:
    UpdateSchedule.objects.filter(pk=schedule.pk).update(last_checked_at=now, last_result=result[:4000])
    log.info("schedule %s: %s", schedule.pk, result)
    return result
