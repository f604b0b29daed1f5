"""The rolling plan of a cluster schedule's occurrence: each node's own update time.

Made (stored as UpdatePlan and PlanEntry rows) when the occurrence's first beat
entry fires, or earlier when an operator moves or excludes a node; shown as a
preview before that. Runs read their node's entry: it leaves the load balancer at
`out_at`, its users are logged off at `planned_at`. When a node overruns, the
nodes after it are moved later (never earlier: their users were told a time) and
told the new time (replan).
"""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef, Subquery
from django.utils import timezone

from audit.records import Operation, record
from nodes.models import Cluster, Node, NodeKey
from updates.models import (
    LeftSchedule,
    PlanEntry,
    Release,
    UpdateLock,
    UpdatePlan,
    UpdateRun,
    UpdateSchedule,
    UpdateStep,
)
from updates.notices import send_notice
from updates.placement import Bounds, Slot, Todo, place, problem

log = logging.getLogger(__name__)
# How late a node may be logged off and still count as on time for the nodes after it.
LATE_OFF = timedelta(seconds=5)
DELAY_NOTICE = "The update of this server is delayed: you will be logged off {when}. Please save your work."


class PlanRefused(Exception):
    """An operator's change to a plan that would break it; the message says why."""


# --- who is in a plan, and for how long ---------------------------------------------------


def expected_durations(nodes: list[Node], default: timedelta) -> dict[int, timedelta]:
    """From logging users off to back in service: the median of each node's last three
    successful updates, else the cluster's setting. Two queries however many nodes."""
    steps = UpdateStep.objects.filter(run=OuterRef("pk"))
    runs = (
        UpdateRun.objects.filter(node__in=nodes, state=UpdateRun.State.SUCCEEDED)
        .annotate(
            off=Subquery(steps.filter(name="drain").values("started_at")[:1]),
            back=Subquery(steps.filter(name="resume").values("finished_at")[:1]),
        )
        .filter(off__isnull=False, back__isnull=False)
        .order_by("node_id", "-finished_at")
        .values_list("node_id", "off", "back")
    )
    seen: dict[int, list[timedelta]] = defaultdict(list)
    for node_id, off, back in runs:
        if len(seen[node_id]) < 3:
            seen[node_id].append(back - off)
    return {node.pk: _median(seen[node.pk]) if seen[node.pk] else default for node in nodes}


def _median(durations: list[timedelta]) -> timedelta:
    return timedelta(seconds=statistics.median(d.total_seconds() for d in durations))


@dataclass
class Candidates:
    nodes: list[Node]
    left_out: dict[str, str] = field(default_factory=dict)  # hostname -> why


def candidates(schedule: UpdateSchedule) -> Candidates:
    """The nodes of the schedule that would update, and why the others would not."""
    nodes = list(schedule.target_nodes().select_related("cluster").order_by("hostname"))
    ids = [node.pk for node in nodes]
    left = dict(LeftSchedule.objects.filter(schedule=schedule).values_list("node_id", "reason"))
    locks = dict(UpdateLock.objects.active().filter(node_id__in=ids).values_list("node_id", "reason"))
    trusted = set(NodeKey.objects.accepted().filter(node_id__in=ids).values_list("node_id", flat=True))
    newest = {channel: Release.newest(channel) for channel in {node.channel for node in nodes}}
    found = Candidates([])
    for node in nodes:
        release = newest.get(node.channel)
        why = (
            f"left the schedule: {left[node.pk]}" if node.pk in left
            else f"update lock: {locks[node.pk]}" if node.pk in locks
            else "no accepted key" if node.pk not in trusted
            else "up to date" if release is None or release.version == node.installed_version
            else ""
        )  # fmt: skip
        if why:
            found.left_out[node.hostname] = why
        else:
            found.nodes.append(node)
    return found


def bounds_of(cluster: Cluster, occurrence: datetime) -> Bounds:
    return Bounds(occurrence, cluster.lb_lead_time, cluster.max_parallel_updates, cluster.out_of_lb_bound)


def _bounds(plan: UpdatePlan) -> Bounds:
    return Bounds(plan.occurrence, plan.lead, plan.cap, plan.out_bound)


# --- making a plan --------------------------------------------------------------------------


@dataclass
class Preview:
    """A plan as the schedule's page shows it: stored, or computed on the fly."""

    schedule: UpdateSchedule
    occurrence: datetime
    bounds: Bounds
    entries: list[PlanEntry]
    left_out: dict[str, str]
    stored: bool


def _entries(schedule: UpdateSchedule, occurrence: datetime) -> tuple[list[PlanEntry], Bounds, dict[str, str]]:
    cluster = schedule.cluster
    assert cluster is not None
    bounds = bounds_of(cluster, occurrence)
    found = candidates(schedule)
    expected = expected_durations(found.nodes, cluster.expected_update)
    todo = [Todo(node.hostname, expected[node.pk], occurrence) for node in found.nodes]
    slots = {slot.node: slot for slot in place(bounds, todo)}
    entries = [
        PlanEntry(node=node, planned_at=slots[node.hostname].at, expected=expected[node.pk]) for node in found.nodes
    ]
    return entries, bounds, found.left_out


def preview(schedule: UpdateSchedule, occurrence: datetime) -> Preview:
    plan = UpdatePlan.objects.filter(schedule=schedule, occurrence=occurrence).first()
    if plan is not None:
        entries = list(plan.entries.select_related("node", "plan"))
        left = candidates(schedule).left_out
        return Preview(schedule, occurrence, _bounds(plan), entries, left, stored=True)
    entries, bounds, left = _entries(schedule, occurrence)
    assert schedule.cluster is not None
    unsaved = UpdatePlan(schedule=schedule, cluster=schedule.cluster, occurrence=occurrence, lead=bounds.lead,
                         cap=bounds.cap, out_bound=bounds.out_bound)  # fmt: skip
    for entry in entries:
        entry.plan = unsaved
    return Preview(schedule, occurrence, bounds, entries, left, stored=False)


def ensure_plan(schedule: UpdateSchedule, occurrence: datetime) -> UpdatePlan:
    """The occurrence's plan, made now if it does not exist yet (two firings may race:
    the unique constraint keeps one). A node that may update now but was not in the
    plan (its lock removed, a new release, a new node) joins it after the others."""
    plan = UpdatePlan.objects.filter(schedule=schedule, occurrence=occurrence).first()
    if plan is not None:
        _add_late_comers(plan, schedule)
        return plan
    entries, bounds, _ = _entries(schedule, occurrence)
    assert schedule.cluster is not None
    try:
        with transaction.atomic():
            plan = UpdatePlan.objects.create(
                schedule=schedule, cluster=schedule.cluster, occurrence=occurrence, lead=bounds.lead,
                cap=bounds.cap, out_bound=bounds.out_bound,
            )  # fmt: skip
            for entry in entries:
                entry.plan = plan
            PlanEntry.objects.bulk_create(entries)
    except IntegrityError:
        return UpdatePlan.objects.get(schedule=schedule, occurrence=occurrence)
    log.info("%s: %s", plan, ", ".join(f"{e.node} {timezone.localtime(e.planned_at):%H:%M:%S}" for e in entries))
    return plan


def _add_late_comers(plan: UpdatePlan, schedule: UpdateSchedule) -> None:
    entries = list(plan.entries.select_related("node", "plan"))
    planned = {entry.node_id for entry in entries}
    new = [node for node in candidates(schedule).nodes if node.pk not in planned]
    if not new:
        return
    assert schedule.cluster is not None
    expected = expected_durations(new, schedule.cluster.expected_update)
    fixed = [_slot_of(entry) for entry in entries if not entry.excluded]
    todo = [Todo(node.hostname, expected[node.pk], max(plan.occurrence, timezone.now() + plan.lead)) for node in new]
    slots = {slot.node: slot for slot in place(_bounds(plan), todo, fixed)}
    PlanEntry.objects.bulk_create(
        [
            PlanEntry(
                plan=plan,
                node=node,
                planned_at=slots[node.hostname].at,
                expected=expected[node.pk],
                note="joined the plan late",
            )
            for node in new
        ],  # fmt: skip
        ignore_conflicts=True,  # two firings at once: the first one's entry stays
    )


def entry_for(run: UpdateRun) -> PlanEntry | None:
    """The plan entry of a scheduled cluster node's run, kept on this instance once read
    (or read by attach_entries): a hold reads it, and the chain it queues reads it again
    for its users' time (chains.logoff_at)."""
    if run.schedule_id is None or run.scheduled_for is None:
        return None
    if _ENTRY in run.__dict__:
        return run.__dict__[_ENTRY]  # type: ignore[no-any-return]
    entry = (
        PlanEntry.objects.select_related("plan")
        .filter(plan__schedule_id=run.schedule_id, plan__occurrence=run.scheduled_for, node_id=run.node_id)
        .first()
    )
    run.__dict__[_ENTRY] = entry
    return entry


# Where entry_for and attach_entries keep a run's plan entry on the instance, as Django
# keeps the rows it prefetched: they live as long as the instance (one task's work).
_ENTRY = "_plan_entry"


def attach_entries(runs: Iterable[UpdateRun]) -> None:
    """Read the plan entries of many scheduled cluster runs at once (a firing's: one
    query per occurrence, not one per run, and three per run when its chain is built)
    and keep each on its run, where entry_for finds it."""
    by_occurrence: dict[tuple[int, datetime], list[UpdateRun]] = defaultdict(list)
    for run in runs:
        if run.schedule_id and run.scheduled_for and run.node.cluster_id:
            by_occurrence[(run.schedule_id, run.scheduled_for)].append(run)
    for (schedule_id, occurrence), some in by_occurrence.items():
        entries = PlanEntry.objects.select_related("plan").filter(
            plan__schedule_id=schedule_id, plan__occurrence=occurrence, node_id__in=[run.node_id for run in some]
        )
        found = {entry.node_id: entry for entry in entries}
        for run in some:
            run.__dict__[_ENTRY] = found.get(run.node_id)


# --- an operator's changes ------------------------------------------------------------------


def _started(entry: PlanEntry, now: datetime) -> bool:
    """The node's update has begun: it left (or is leaving) the load balancer."""
    run = UpdateRun.objects.filter(
        node_id=entry.node_id, schedule_id=entry.plan.schedule_id, scheduled_for=entry.plan.occurrence
    ).first()
    return entry.out_at <= now or bool(run and run.update_phase_started)


def move(entry: PlanEntry, planned_at: datetime, user: Any, now: datetime | None = None) -> None:
    """Move a node's update time, within the plan's bounds and before its update begins."""
    now = now or timezone.now()
    if entry.excluded:
        raise PlanRefused(f"{entry.node} is left out of this occurrence: put it back first.")
    if _started(entry, now) or planned_at - entry.plan.lead <= now:
        raise PlanRefused(f"{entry.node}'s update has begun, or would begin in the past: its time stays.")
    others = [_slot_of(e) for e in entry.plan.entries.select_related("plan").exclude(pk=entry.pk) if not e.excluded]
    slot = Slot(entry.node.hostname, planned_at, planned_at + entry.expected, planned_at - entry.plan.lead)
    why = problem(_bounds(entry.plan), others, slot)
    if why:
        raise PlanRefused(f"{entry.node} cannot update at {timezone.localtime(planned_at):%Y-%m-%d %H:%M}: {why}.")
    before = entry.planned_at
    entry.planned_at, entry.changed_by = planned_at, user if getattr(user, "pk", None) else None
    entry.note = f"moved by {user}"
    with transaction.atomic():
        entry.save(update_fields=["planned_at", "changed_by", "note"])
        _record(Operation.PLAN_MOVE, entry, user, changes={"planned_at": [before, planned_at]})


def _record(operation: Operation, entry: PlanEntry, user: Any, changes: dict[str, Any] | None = None) -> None:
    """A row about the schedule (its page shows the plan), naming the node and the occurrence."""
    record(
        operation, entry.plan.schedule, user=user, changes=changes, node=entry.node.hostname,
        occurrence=entry.plan.occurrence,
    )  # fmt: skip


def set_excluded(entry: PlanEntry, excluded: bool, user: Any, now: datetime | None = None) -> None:
    """Leave a node out of this occurrence (its run, if it has one, is called off) or put it back."""
    from updates.runs.end import cancel_run  # runs build on plans: imported when used

    now = now or timezone.now()
    if _started(entry, now):
        raise PlanRefused(f"{entry.node}'s update has begun: it can no longer be left out or put back.")
    if not excluded:
        others = [_slot_of(e) for e in entry.plan.entries.select_related("plan").exclude(pk=entry.pk) if not e.excluded]
        why = problem(_bounds(entry.plan), others, _slot_of(entry))
        if why:
            raise PlanRefused(f"{entry.node} does not fit back at its time: {why}. Move it first.")
    entry.excluded, entry.changed_by = excluded, user if getattr(user, "pk", None) else None
    entry.note = f"{'left out' if excluded else 'put back'} by {user}"
    with transaction.atomic():
        entry.save(update_fields=["excluded", "changed_by", "note"])
        _record(Operation.PLAN_LEAVE_OUT if excluded else Operation.PLAN_PUT_BACK, entry, user)
        if excluded:
            run = (
                UpdateRun.objects.running()
                .filter(node_id=entry.node_id, schedule_id=entry.plan.schedule_id, scheduled_for=entry.plan.occurrence)
                .first()
            )
            if run is not None:
                cancel_run(run.pk, f"left out of {entry.plan} by {user}")


def _slot_of(entry: PlanEntry) -> Slot:
    return Slot(entry.node.hostname, entry.planned_at, entry.back_at, entry.out_at)


# --- an overrun moves the nodes after it ----------------------------------------------------


@dataclass(frozen=True)
class _Progress:
    out: datetime | None  # left the load balancer
    off: datetime | None  # users logged off
    back: datetime | None  # back in service (or the run ended)
    held: datetime | None = None  # took its update slot


def _committed_off(seen: _Progress, planned_at: datetime) -> datetime | None:
    """When a node's users are (or will be) logged off for good: a node that holds its
    update slot has its drain on the way, ahead of its time at the earliest (hold), and
    no replan can move it any more (its node logs them off at the time it was given)."""
    if seen.off is not None or seen.held is None:
        return seen.off
    return max(seen.held, planned_at)


def _progress(plan: UpdatePlan) -> dict[int, _Progress]:
    steps = UpdateStep.objects.filter(run=OuterRef("pk"))
    runs = UpdateRun.objects.filter(schedule_id=plan.schedule_id, scheduled_for=plan.occurrence).annotate(
        out=Subquery(steps.filter(name="exclude").values("started_at")[:1]),
        off=Subquery(steps.filter(name="drain").values("started_at")[:1]),
        held=Subquery(steps.filter(name="slot", state=UpdateStep.State.SUCCEEDED).values("finished_at")[:1]),
    )
    return {
        node_id: _Progress(out, off, finished, held)
        for node_id, out, off, finished, held in runs.values_list("node_id", "out", "off", "finished_at", "held")
    }


def next_look(entry: PlanEntry, now: datetime) -> datetime | None:
    """When the node of `entry`, holding until its planned time, must next look at its
    plan (replan); None: now. A replan moves nodes only once another node of the plan
    is logged off (late, or overrunning). While no other node is logged off and not back,
    nothing can move before the next of them is due to be logged off; a look
    TGP_PLAN_LOOK after that finds one that went off late as soon as the looks every
    TGP_PLAN_LOOK would have. So the nodes of a plan do not all look at once at each
    interval, and a fleet-wide update's holds do not crowd its first waves (issue 16)."""
    progress = _progress(entry.plan)
    due = []
    for node_id, planned_at in (
        entry.plan.entries.filter(excluded=False).exclude(pk=entry.pk).values_list("node_id", "planned_at")
    ):
        seen = progress.get(node_id)
        if seen is not None and seen.back is not None:
            continue  # back (or ended): it moves nobody any more
        if seen is not None and seen.off is not None:
            return None  # updating: it may overrun
        due.append(planned_at)
    if not due:
        return entry.planned_at  # nobody else to wait for: nothing can move it
    first = min(due)
    # Its time has passed and it is not logged off (in line for a slot): look as before.
    return first + timedelta(seconds=settings.TGP_PLAN_LOOK) if now < first else None


def turn_comes_first(entry: PlanEntry) -> bool:
    """Whether every node of the plan due before this one holds its update slot already
    (or has ended): only then may this one take a free slot ahead of its time (hold),
    never one that a node due before it is still holding out for. One query."""
    before = PlanEntry.objects.filter(plan=entry.plan_id, excluded=False, planned_at__lt=entry.planned_at)
    waiting = UpdateRun.objects.running().filter(
        schedule_id=entry.plan.schedule_id, scheduled_for=entry.plan.occurrence, node__in=before.values("node_id")
    )
    held = UpdateStep.objects.filter(run=OuterRef("pk"), name="slot", state=UpdateStep.State.SUCCEEDED)
    return not waiting.exclude(Exists(held)).exists()


def expected_back(off: datetime, expected: timedelta, now: datetime) -> datetime:
    """When a node logged off at `off` is expected back: as expected, and once past
    that, in steps of half its expected duration. Steps, not "now plus a bit": the
    nodes after it move (and their users hear of it) once per step, not at every look."""
    back = off + expected
    if now < back:
        return back
    step = expected / 2
    return back + step * ((now - back) // step + 1)


def replan(plan: UpdatePlan, now: datetime | None = None) -> list[PlanEntry]:
    """Move the nodes that would otherwise break the bounds later, from what has really
    happened: a node updating past its expected end is expected back half its expected
    duration from now. Nobody moves earlier. Each moved node's users are told the new
    time. Returns the moved entries."""
    now = now or timezone.now()
    with transaction.atomic():
        # One replan of a plan at a time: two holds may ask at once.
        plan = UpdatePlan.objects.select_for_update().get(pk=plan.pk)
        entries = list(plan.entries.select_related("node", "plan").filter(excluded=False).order_by("planned_at", "pk"))
        progress = _progress(plan)
        fixed, todo = [], []
        for entry in entries:
            seen = progress.get(entry.node_id, _Progress(None, None, None))
            if seen.back is not None:
                continue  # back (or ended): it holds no place any more
            off = _committed_off(seen, entry.planned_at)
            if off is not None:
                # Logged off a moment late (a worker's round trip) is on time: only a real
                # delay, or an overrun, moves the others.
                late = off - entry.planned_at > LATE_OFF
                back = expected_back(off if late else entry.planned_at, entry.expected, now)
                fixed.append(Slot(entry.node.hostname, off, back, seen.out or off - plan.lead))
            else:
                # Out already: out from now on, as far as the future is concerned (the
                # past is history, and the semaphore kept it within the bound).
                out = now if seen.out else None
                todo.append((entry, Todo(entry.node.hostname, entry.expected, entry.planned_at, out)))
        # The nodes out already go first: they hold their places, and one placed after
        # a node that is still in line could find every future instant taken.
        todo.sort(key=lambda pair: (pair[1].out_since is None, pair[0].planned_at, pair[0].pk))
        try:
            slots = {s.node: s for s in place(_bounds(plan), [t for _, t in todo], fixed)}
        except ValueError as exc:  # the bounds changed under the plan: the semaphores still decide
            log.warning("%s: not replanned: %s", plan, exc)
            return []
        moved = []
        told = []
        for entry, _ in todo:
            new = slots[entry.node.hostname].at
            if new > entry.planned_at:
                if _step(new) != _step(entry.planned_at):
                    told.append(entry)  # its users read minutes: a move within one is not news
                entry.note = f"delayed from {timezone.localtime(entry.planned_at):%H:%M:%S}: a node before it overran"
                entry.planned_at = new
                entry.save(update_fields=["planned_at", "note"])
                moved.append(entry)
        for entry in told:
            _tell_new_time(entry)
    if moved:
        moves = ", ".join(f"{e.node} to {timezone.localtime(e.planned_at):%H:%M:%S}" for e in moved)
        log.warning("%s: delayed %s", plan, moves)
    return moved


def _step(moment: datetime) -> int:
    """The notice step (TGP_PLAN_NOTICE_STEP, a minute: what a notice shows) a time falls in."""
    return int(moment.timestamp() // settings.TGP_PLAN_NOTICE_STEP)


def _tell_new_time(entry: PlanEntry) -> None:
    """The node's users learn the new time (a notice; the agent writes it in its zone)."""
    stamp = int(entry.planned_at.timestamp())
    send_notice(entry.node, f"plan-{entry.pk}-{stamp}", DELAY_NOTICE, entry.planned_at)
