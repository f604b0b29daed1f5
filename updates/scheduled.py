"""What happens when a schedule's beat entries fire: one task per entry, fanning
out to all the schedule's nodes at once (a fixed number of queries, however many
nodes: start.start_scheduled, chains.start_update_phases). Safe to fire twice (a second
beat, a re-armed lost firing): a run for the same node and update time is never
started twice, and a firing marked fired starts nothing.

A firing re-arms its entry (updates.schedules.arm), then acts, for itself and for
every other schedule whose entry of the same kind is due at the same instant (claim:
the first task of an instant does the work of all; 500 schedules due at 03:00 are one
start, not 500 one after another in two worker processes):
- the update entry starts (or carries on) the run of its update;
- the download entry does so only if it is the last download before that update;
  an earlier one, and every firing of a download-only schedule, only downloads
  the newest release onto the node (a run with trigger `download`: no maintenance
  mode, no notice).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from contextlib import nullcontext
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


Group = tuple[UpdateSchedule, list[Node]]  # a schedule and the nodes it starts


def start_runs(groups: list[Group], slot: datetime, kind: str = "update") -> dict[int, list[str]]:
    """Start, or carry on, the run of each schedule's nodes for the update at `slot`,
    every node of every schedule at once (start.start_scheduled, chains.start_update_phases):
    a fixed number of queries however many nodes. Returns a line per node, in order,
    per schedule."""
    nodes = [node for _, some in groups for node in some]
    runs = UpdateRun.objects.filter(node__in=nodes, scheduled_for=slot).select_related("node__cluster", "release")
    existing = {run.node_id: run for run in runs}
    newest = newest_releases([node for node in nodes if node.pk not in existing])
    targets = [
        (node, release, schedule)
        for schedule, some in groups
        for node in some
        if node.pk not in existing and (release := updates_for(node, newest))
    ]
    started = start_scheduled(targets, trigger=UpdateRun.Trigger.SCHEDULED, scheduled_for=slot)
    outcomes = _by_target(targets, started)
    # The update entry arms a timer for a node whose own time comes later (a plan's later
    # wave); a run it starts downloads first, then waits for its own time.
    start_update_phases(list(existing.values()), arm=kind == "update")
    if kind == "update":
        start_update_phases([outcome for outcome in started if isinstance(outcome, UpdateRun)], arm=True)
    lines: dict[int, list[str]] = {}
    for schedule, some in groups:
        lines[schedule.pk] = [_start_line(node, existing.get(node.pk), outcomes.get((schedule.pk, node.pk)), slot)
                              for node in some]  # fmt: skip
    return lines


def _by_target(
    targets: list[tuple[Node, Release, UpdateSchedule]], started: list[UpdateRun | UpdateRefused]
) -> dict[tuple[int, int], UpdateRun | UpdateRefused]:
    """start_scheduled's outcomes by (schedule, node): a node may be in two schedules of one batch."""
    return {(schedule.pk, node.pk): outcome for (node, _, schedule), outcome in zip(targets, started, strict=True)}


def _start_line(
    node: Node, existing: UpdateRun | None, outcome: UpdateRun | UpdateRefused | None, slot: datetime
) -> str:
    if existing is not None:
        return f"{node}: run {existing.pk}"
    if outcome is None:
        return f"{node}: no updates available"
    if isinstance(outcome, AlreadyStarted):
        return f"{node}: already started for {slot:%Y-%m-%d %H:%M}"
    if isinstance(outcome, UpdateRefused):
        return f"{node}: not started: {outcome}"
    return f"{node}: run {outcome.pk} to {outcome.release.version}"


def download_runs(groups: list[Group]) -> dict[int, list[str]]:
    """Download the newest release onto each schedule's nodes, nothing else: its verified
    files wait there for the update (or an Auto-Update), which then fetches none again.
    All nodes of all schedules at once; a line per node, in order, per schedule."""
    newest = newest_releases([node for _, some in groups for node in some])
    targets = [
        (node, release, schedule)
        for schedule, some in groups
        for node in some
        if (release := updates_for(node, newest))
    ]
    started = start_scheduled(targets, trigger=UpdateRun.Trigger.DOWNLOAD)
    outcomes = _by_target(targets, started)
    lines: dict[int, list[str]] = {}
    for schedule, some in groups:
        lines[schedule.pk] = []
        for node in some:
            outcome = outcomes.get((schedule.pk, node.pk))
            if outcome is None:
                line = f"{node}: no updates available"
            elif isinstance(outcome, UpdateRefused):
                line = f"{node}: not downloaded: {outcome}"
            else:
                line = f"{node}: download run {outcome.pk} of {outcome.release.version}"
            lines[schedule.pk].append(line)
    return lines


def fire(schedule_id: int, kind: str, at: datetime | None = None) -> str:
    """The download or update entry of a schedule fired (for its firing at `at`):
    re-arm it, check for updates and start (or carry on) a run per node, or only
    download; and the same for every other schedule whose entry is due at the same
    instant (claim), so that 500 schedules due at 03:00 are one start, not 500. The
    entries of those fire too, later, and find their firing done. Returns the logged
    result (of this schedule)."""
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
    looked = releases_as_of(firing.at)
    with transaction.atomic():
        batch = claim(schedule, firing, now)
        if not batch:
            return f"{kind} of {firing.at:%Y-%m-%d %H:%M}: fired already, with the schedules due at the same time"
        results, failed = fire_batch(batch, own=schedule.pk)
        if failed:  # left to their own tasks: each fails alone, as before batches
            UpdateSchedule.objects.filter(pk__in=failed).update(**{f"{kind}_fired_for": None})
            batch = [(other, f) for other, f in batch if other.pk not in failed]
        for other, _ in batch:
            other.last_checked_at, other.last_result = now, (looked + results[other.pk])[:4000]
            log.info("schedule %s: %s", other.pk, other.last_result)
        UpdateSchedule.objects.bulk_update([other for other, _ in batch], ["last_checked_at", "last_result"])
    return looked + results[schedule.pk]


def claim(schedule: UpdateSchedule, firing: Firing, now: datetime) -> list[tuple[UpdateSchedule, Firing]]:
    """This schedule's firing and that of every schedule whose entry of the same kind is
    armed for the same instant, each marked fired (`<kind>_fired_for`) so that its own
    task, when it comes, starts nothing; empty if this schedule's firing was claimed
    already (by another schedule's firing, or a second beat). Other schedules locked
    elsewhere (firing themselves, being edited) are left to their own tasks. Inside the
    caller's transaction: the mark and the runs commit together, or neither."""
    marked = f"{firing.kind}_fired_for"
    rows = UpdateSchedule.objects.select_for_update(of=("self",)).select_related("cluster", "node")
    own = rows.filter(pk=schedule.pk, time_control=True).exclude(**{marked: firing.at}).first()
    if own is None:
        return []
    # Not only enabled entries: beat disables a one-off entry as soon as it has sent it,
    # and its task may wait in the queue behind this one.
    due = rows.select_for_update(skip_locked=True, of=("self",)).filter(
        time_control=True, **{f"{firing.kind}_task__clocked__clocked_time": firing.at}
    )
    batch = [(own, firing)]
    for other in due.exclude(pk=own.pk).exclude(**{marked: firing.at}):
        # Its firing as the schedule is now (an entry armed before an edit fires nothing).
        if (found := firing_for(other, firing.kind, firing.at, now)) is not None:
            batch.append((other, found))
    UpdateSchedule.objects.filter(pk__in=[s.pk for s, _ in batch]).update(**{marked: firing.at})
    return batch


def fire_batch(batch: list[tuple[UpdateSchedule, Firing]], own: int) -> tuple[dict[int, str], set[int]]:
    """Start (or carry on) the runs, or the downloads, of every firing in the batch at
    once. Returns each schedule's result, and the other schedules whose own part (their
    nodes, their cluster's plan) failed: they are left out, so that one broken schedule
    does not stop every firing of its instant; the firing schedule's (`own`) failure
    raises, as it did before batches."""
    singles = Node.objects.select_related("cluster").in_bulk([s.node_id for s, _ in batch if s.node_id])
    starts: dict[tuple[datetime, str], list[Group]] = defaultdict(list)
    downloads: list[Group] = []
    heads: dict[int, str] = {}
    failed: set[int] = set()
    for schedule, firing in batch:
        try:
            # A cluster's plan in a savepoint: a failed one leaves nothing behind. (A single
            # system's part reads nothing: no savepoint, two queries less per schedule.)
            with transaction.atomic() if schedule.cluster_id else nullcontext():
                head, nodes, starting = _targets(schedule, firing, singles)
        except Exception:
            if schedule.pk == own:
                raise
            log.exception("schedule %s left out of the firing of schedule %s", schedule.pk, own)
            failed.add(schedule.pk)
            continue
        heads[schedule.pk] = head
        if starting:
            assert firing.update_at is not None
            starts[(firing.update_at, firing.kind)].append((schedule, nodes))
        else:
            downloads.append((schedule, nodes))
    lines: dict[int, list[str]] = {}
    for (slot, kind), groups in starts.items():
        lines |= start_runs(groups, slot, kind)
    if downloads:
        lines |= download_runs(downloads)
    return {pk: head + "; ".join(lines[pk] or ["no nodes"]) for pk, head in heads.items()}, failed


def _targets(schedule: UpdateSchedule, firing: Firing, singles: dict[int, Node]) -> tuple[str, list[Node], bool]:
    """A firing's result heading, its nodes, and whether it starts runs (else it only
    downloads)."""
    if schedule.node_id:
        nodes = [singles[schedule.node_id]] if schedule.node_id in singles else []
    else:
        nodes = list(schedule.target_nodes().select_related("cluster"))
    if firing.update_at is None or not (firing.kind == "update" or starts_run(schedule, firing)):
        return "download only: ", nodes, False
    if schedule.cluster_id:
        # Each node's own time, planned once for the occurrence; left-out nodes get no run.
        plan = ensure_plan(schedule, firing.update_at)
        planned = set(plan.entries.filter(excluded=False).values_list("node_id", flat=True))
        nodes = [node for node in nodes if node.pk in planned]
    return f"{firing.kind} for {timezone.localtime(firing.update_at):%Y-%m-%d %H:%M}: ", nodes, True


def _log(schedule: UpdateSchedule, now: datetime, result: str) -> str:
    UpdateSchedule.objects.filter(pk=schedule.pk).update(last_checked_at=now, last_result=result[:4000])
    log.info("schedule %s: %s", schedule.pk, result)
    return result
