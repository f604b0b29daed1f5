"""Which steps a Celery chain carries, and how it gets queued.

A chain carries one *segment* of a run's steps and then control.complete. Chains
are queued from one place: queue_from registers a QueueChain with
transaction.on_commit (queue_started one QueueStarted for the runs of a start),
so that no message can refer to a row that is not committed, and a test can read
which run was queued from which step.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from celery import chain, signature
from django.db import transaction
from django.utils import timezone

from agent.shared.protocol import CONTROL_QUEUE, NODE_STEPS, SLOT_PRIORITY, StepCommand, control_task, node_task
from updates import plans, trust
from updates.models import UpdateRun, UpdateStep
from updates.runs import lifecycle, rollouts

log = logging.getLogger(__name__)


# Control steps after which a chain stops: the rest is queued once a slot or place is
# held, and a hold, once its node's time has come, asks for the slot after it itself,
# in its own task (cluster_cap.hold).
ENDS_CHAIN = ("leave", "hold", "slot")


class RunFailed(Exception):
    """Stops the chain after the run was recorded as failed (or found ended)."""


def node_payload(run: UpdateRun) -> dict[str, Any]:
    """What a node step needs (StepCommand). Package data is not here on purpose: the
    agent takes sizes and hashes from the TUF metadata it verified, never from a message."""
    cluster = run.node.cluster
    catchup = run.trigger in (UpdateRun.Trigger.CATCHUP_FULL, UpdateRun.Trigger.CATCHUP_PARTIAL)
    return StepCommand(
        run=run.pk, node=run.node.hostname, version=run.release.version, packages=tuple(run.packages),
        message=run.message, cluster=cluster.name if cluster else None, fence=run.slot_token, catchup=catchup,
        at=logoff_at(run),
    ).to_wire()  # fmt: skip


def logoff_at(run: UpdateRun) -> float | None:
    """When the run's users are logged off, for their notice: a scheduled cluster node's
    planned time, a single system's update time; None (right away) for an Auto-Update."""
    if run.scheduled_for is None:
        return None
    entry = plans.entry_for(run) if run.node.cluster_id else None
    return (entry.planned_at if entry else run.scheduled_for).timestamp()


def step_names(run: UpdateRun) -> list[str]:
    return list(run.steps.order_by("position").values_list("name", flat=True))


def step_states(run: UpdateRun) -> list[tuple[str, str]]:
    """The run's steps as (name, state), in their order: one query."""
    return list(run.steps.order_by("position").values_list("name", "state"))


class Pending(NamedTuple):
    """The step a run goes on from, and its state."""

    name: str
    state: str


def resume_point(steps: Sequence[tuple[str, str]]) -> Pending | None:
    """Where a run goes on, from its steps' (name, state) in their order: the first
    unfinished step from the furthest one that has begun. A chain runs its steps in
    order, so a step begun (or done) means every step before it succeeded, whatever the
    database shows: the control workers process one node's reports side by side, and
    an earlier step's report may land after a later one's. Carried on from the first
    unfinished step instead, a run would do its notify and download again before its
    drain (a fleet-wide update lost half a minute to that, docs/performance.md)."""
    start = max((i for i, (_, state) in enumerate(steps) if state != UpdateStep.State.PENDING), default=0)
    return next((Pending(*step) for step in steps[start:] if step[1] not in UpdateStep.FINISHED), None)


def pending_step(run: UpdateRun) -> Pending | None:
    """resume_point of a run, in one query."""
    return resume_point(step_states(run))


# --- a scheduled run's two phases ---------------------------------------------------------


def update_phase_at(run: UpdateRun) -> datetime | None:
    """When a scheduled run's update phase begins: a single system's update time; a
    cluster node's planned time less the load-balancer lead (it leaves then), from its
    plan entry (which an overrun before it may move later)."""
    if run.scheduled_for is None:
        return None
    cluster = run.node.cluster
    if cluster is None:
        return run.scheduled_for
    entry = plans.entry_for(run)
    return entry.out_at if entry else run.scheduled_for - cluster.lb_lead_time


def waiting(run: UpdateRun) -> bool:
    """A scheduled run before its update phase: downloaded (or trying to), nothing disruptive yet."""
    start = update_phase_at(run)
    return bool(start and timezone.now() < start)


# The longest a scheduled run's timers (its update phase; a cluster node's hold) sleep
# in one countdown: Redis holds a countdown message unacknowledged (past the visibility
# timeout it comes back as a duplicate), and a plan may move the time later meanwhile.
LONGEST_NAP = 300.0


@dataclass(frozen=True)
class WakeAtPhase:
    """Queues control.update_phase for the run at its phase time (or a nap before it);
    transaction.on_commit calls it, a test can read it."""

    run_id: int
    countdown: float

    def __call__(self) -> None:
        signature("control.update_phase", args=(self.run_id,)).set(queue=CONTROL_QUEUE).apply_async(
            countdown=self.countdown
        )


def wake_at_phase(run: UpdateRun, at: datetime) -> WakeAtPhase:
    wake = WakeAtPhase(run.pk, max(0.0, min((at - timezone.now()).total_seconds(), LONGEST_NAP)))
    transaction.on_commit(wake)
    return wake


def start_update_phase(run_id: int, *, arm: bool = False) -> bool:
    """Carry a scheduled run from its download into its update phase, once, at its
    time. Before it: with `arm`, a timer (control.update_phase) comes back then; the
    update entry, the timer itself and the reconciler arm it. A download still under
    way continues the run itself when it succeeds."""
    run = UpdateRun.objects.select_related("node__cluster", "release").get(pk=run_id)
    if run.trigger != UpdateRun.Trigger.SCHEDULED or run.state != UpdateRun.State.RUNNING:
        return False
    if run.update_phase_started:
        # Carried on already (by the update entry, mostly): the timer the download armed
        # finds nothing to do, in one query. A fleet-wide update has thousands of them,
        # due at its busiest instants (bench/fleet_update.py).
        return False
    at = update_phase_at(run)
    if at is not None and timezone.now() < at:
        if arm:
            lifecycle.touch(run_id)  # resting until its time is not silence (the reaper)
            wake_at_phase(run, at)
        return False
    if rollouts.at_gate(run) != rollouts.GO:
        return False  # its rollout is paused (its resume carries it on) or cancelled (so is the run)
    pending = pending_step(run)
    if pending is None or not _claim_phase(run, *pending):
        return False
    queue_from(run_id, pending.name)
    return True


def _claim_phase(run: UpdateRun, pending: str, state: str) -> bool:
    """Whether this caller carries the run into its update phase from `pending` (in
    `state`, its resume_point): not while its download runs (its success
    carries on), never to a withdrawn release (the run fails before anything
    disruptive is queued), and only once (a conditional UPDATE: the update entry, a late
    download success and the second download round may all get here)."""
    if pending == "download" and state == UpdateStep.State.RUNNING:
        return False
    if run.release.withdrawn_at is not None:
        from updates.runs.end import fail_run  # end builds on chains: imported when used

        fail_run(run.pk, run.release.withdrawn_reason)
        return False
    return bool(UpdateRun.objects.filter(pk=run.pk, update_phase_started=False).update(update_phase_started=True))


def start_update_phases(runs: Sequence[UpdateRun], *, arm: bool) -> list[int]:
    """start_update_phase for many runs at once (a schedule's update entry: every node of
    a cluster), loaded with their node, cluster and release: their plan entries and their
    steps are read in one query each instead of four per run, the claims are one
    transaction, and the chains of the runs carried on are queued from the objects at
    hand, in one callback after the commit. Returns the ids of the runs carried on."""
    if not runs:
        return []
    plans.attach_entries(runs)
    now = timezone.now()
    due, ahead = [], []
    for run in runs:
        if run.trigger != UpdateRun.Trigger.SCHEDULED or run.state != UpdateRun.State.RUNNING:
            continue
        at = update_phase_at(run)
        if at is None or now >= at:
            due.append(run)
        elif arm and not run.update_phase_started:
            ahead.append((run, at))
    # A paused rollout's runs wait for its resume, a cancelled one's are called off.
    gates = rollouts.at_gates(run for run in due if not run.update_phase_started)
    due = [run for run in due if gates.get(run.pk, rollouts.GO) == rollouts.GO]
    if not (due or ahead):
        return []
    steps: dict[int, list[tuple[str, str]]] = defaultdict(list)
    rows = UpdateStep.objects.filter(run__in=due).order_by("run_id", "position").values_list("run_id", "name", "state")
    for run_id, name, state in rows:
        steps[run_id].append((name, state))
    queued: list[QueueChain] = []
    with transaction.atomic():
        lifecycle.touch_all([run.pk for run, _ in ahead])  # resting until its time is not silence (the reaper)
        for run, at in ahead:
            wake_at_phase(run, at)
        for run in due:
            pending = resume_point(steps[run.pk])
            if pending is not None and _claim_phase(run, *pending):
                queued.append(QueueChain(run.pk, pending.name, run, tuple(name for name, _ in steps[run.pk])))
        if queued:
            transaction.on_commit(QueueStarted(tuple(queued)))
    return [chain.run_id for chain in queued]


# --- building a chain -------------------------------------------------------------------


def segment(run: UpdateRun, from_step: str, names: Sequence[str] | None = None) -> tuple[list[str], bool]:
    """The steps one chain carries from `from_step`, and whether it ends the run.

    A chain stops after the slot and leave steps (which queue the rest once they hold
    a slot or a place, an update slot's fencing token in the payload), after hold
    (which takes the slot itself) and, for a scheduled run, after the download (the
    rest starts at the update time). `names`: the run's steps, if known."""
    names = list(names or step_names(run))
    steps = []
    for name in names[names.index(from_step) :]:
        steps.append(name)
        if name in ENDS_CHAIN or (name == "download" and run.trigger == UpdateRun.Trigger.SCHEDULED and waiting(run)):
            return steps, False
    return steps, True


def build_chain(run: UpdateRun, from_step: str, names: Sequence[str] | None = None) -> Any:
    """Every signature names its queue: node steps the node's, control steps control.

    A node step carries a command signed for it (updates.trust.command). A control step
    right after a node step takes what that step returns, signed by the node (the chain
    hands it on, and it carries the node's snapshot, so verify and complete never wait for
    the step's report); first in a chain, it gets a "go" signed by the control plane."""
    payload = node_payload(run)
    names = list(names or step_names(run))
    steps, last = segment(run, from_step, names)
    # Asking for a slot is not urgent where no node is out of service yet: it yields to
    # the control steps of nodes that are, with the reports. A node that held its users
    # until its planned time (out of the load balancer, its users told the time) needs
    # its slot now (its hold takes it; a chain from the slot, the reconciler's, asks at
    # the default priority): at a fleet-wide update its request waited behind hundreds
    # of reports at the very time its users were to be logged off (bench/fleet_update.py).
    slot_priority = None if "hold" in names else SLOT_PRIORITY
    sigs = []
    for name in [*steps, *(["complete"] if last else [])]:
        if name in NODE_STEPS:
            signed = trust.command("step", payload, step=name)
            sigs.append(signature(node_task(name), args=(signed,), immutable=True).set(queue=run.node.queue))
            continue
        after_node = bool(sigs) and str(sigs[-1].task).startswith("node.")
        args = () if after_node else (trust.go(run.pk, name),)
        sig = signature(control_task(name), args=args, immutable=not after_node).set(queue=CONTROL_QUEUE)
        sigs.append(sig.set(priority=slot_priority) if name == "slot" and slot_priority is not None else sig)
    return chain(*sigs)


# --- queuing a chain --------------------------------------------------------------------


@dataclass(frozen=True)
class QueueChain:
    """Queues a run's chain from one step; transaction.on_commit calls it.

    `run` and `names`: the run (with its node, cluster and release) and its step
    names, when the caller holds them (a start, a slot hand-off): the chain is built
    from them as they are, with no query, which matters on a slot's critical path.
    Without them the run is read again when the chain is queued, and nothing is
    queued if it has ended meanwhile."""

    run_id: int
    from_step: str
    run: UpdateRun | None = field(default=None, compare=False, repr=False)
    names: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __call__(self) -> None:
        run = self.run or _running(self.run_id)
        if run is None:
            return
        build_chain(run, self.from_step, self.names or None).apply_async()
        log.info("run %s dispatched from %s to %s", run.pk, self.from_step, run.node.queue)


def _running(run_id: int) -> UpdateRun | None:
    return UpdateRun.objects.running().select_related("node__cluster", "release").filter(pk=run_id).first()


@dataclass(frozen=True)
class QueueStarted:
    """Queues the chains of many runs (just created, or carried into their update
    phase by a firing) from the objects at hand: one query, however many runs (a whole
    cluster), to leave out any run that ended before the commit."""

    chains: tuple[QueueChain, ...]

    def __call__(self) -> None:
        ids = [queued.run_id for queued in self.chains]
        still = set(UpdateRun.objects.running().filter(pk__in=ids).values_list("pk", flat=True))
        for queued in self.chains:
            if queued.run_id in still:
                queued()


def queue_from(run: UpdateRun | int, step: str, *, names: Sequence[str] | None = None) -> QueueChain:
    """Queue the run's chain from `step` once the transaction has committed. `names`
    (the run's step names) says that `run` is at hand, loaded with its node, cluster
    and release: the chain is built from it without reading it again."""
    if isinstance(run, UpdateRun) and names:
        queued = QueueChain(run.pk, step, run, tuple(names))
    else:
        queued = QueueChain(run if isinstance(run, int) else run.pk, step)
    transaction.on_commit(queued)
    return queued


def queue_started(runs: Sequence[UpdateRun], names: dict[int, list[str]]) -> QueueStarted:
    """Queue the chains of runs just created (each from its first step) once the
    transaction has committed: one callback for the whole start."""
    queued = QueueStarted(tuple(QueueChain(run.pk, names[run.pk][0], run, tuple(names[run.pk])) for run in runs))
    transaction.on_commit(queued)
    return queued
