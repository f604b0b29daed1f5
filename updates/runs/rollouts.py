"""The life of a rollout: the runs of one start of several nodes (an operator's
selection, a whole cluster) or of one occurrence of a cluster schedule, grouped when
they start (`group`), and the one place where Rollout.state changes.

    pause    running -> paused              an operator (group update); by itself when its
                                            failed runs reach its threshold (pause_on_failures)
    resume   paused -> running              an operator; its waiting nodes go on (wake)
    cancel   running, paused -> cancelled   an operator; its nodes not yet started are called off

Each is a conditional UPDATE from the states it allows, and only while a run of it is
running: a finished rollout (derived: none of its runs runs) stays as it is. The
operator's transitions raise RolloutRefused with the reason.

A node *starts* when its run passes the point where it disrupts its node: a cluster
node takes its first gate (a place out of the load balancer, else an update slot:
cluster_cap.take_slot), a scheduled run begins its update phase
(chains.start_update_phase). There, and only there, `at_gate` asks the rollout: one
query by primary key (and, for a cancelled rollout, the run's own call-off). A paused
rollout's node waits (in line, holding
nothing; before its update phase) until `resume` wakes it the way a released slot
wakes a waiter (cluster_cap.wake_waiters); a cancelled rollout's node is called off.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from celery import signature
from django.db import transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from agent.shared.protocol import CONTROL_QUEUE
from audit.records import Operation, record
from nodes.models import Cluster
from updates.models import Rollout, UpdateRun, UpdateStep
from updates.runs import lifecycle

log = logging.getLogger(__name__)

RolloutState = Rollout.State

PAUSE_FROM = frozenset({RolloutState.RUNNING})
RESUME_FROM = frozenset({RolloutState.PAUSED})
CANCEL_FROM = frozenset({RolloutState.RUNNING, RolloutState.PAUSED})

# What a run does at its gate (at_gate).
GO, WAIT, CALLED_OFF = "go", "wait", "called off"


class RolloutRefused(Exception):
    """The rollout cannot move so; the message says why, for the operator."""


# --- grouping runs when they start ----------------------------------------------------------


def group(runs: Sequence[UpdateRun], user: Any = None) -> Rollout | None:
    """The rollout that the runs of one start (not saved yet) belong to, set on each:
    a cluster schedule's occurrence has one (the runs it starts later join it), a start
    of several nodes gets a new one; a single start, and a download-only run, none."""
    if not runs or runs[0].trigger == UpdateRun.Trigger.DOWNLOAD:
        return None
    first = runs[0]
    schedule = first.schedule
    if schedule is not None and first.scheduled_for is not None and schedule.cluster_id is not None:
        rollout, _ = Rollout.objects.get_or_create(
            schedule=schedule, scheduled_for=first.scheduled_for,
            defaults={"title": f"{schedule.name}, {timezone.localtime(first.scheduled_for):%Y-%m-%d %H:%M}",
                      "cluster_id": schedule.cluster_id},
        )  # fmt: skip
    elif len(runs) > 1:
        clusters = {run.node.cluster_id for run in runs}
        cluster = first.node.cluster if len(clusters) == 1 else None
        title = f"cluster {cluster}" if cluster is not None else "a selection"
        rollout = Rollout.objects.create(
            title=f"Auto-Update of {title} ({len(runs)} nodes)", cluster=cluster,
            created_by=user if getattr(user, "pk", None) else None,
        )  # fmt: skip
    else:
        return None
    for run in runs:
        run.rollout = rollout
    return rollout


# --- transitions ------------------------------------------------------------------------------


def _move(rollout_id: int, allowed: frozenset[str], to: str, reason: str, user: Any = None) -> bool:
    live = UpdateRun.objects.running().filter(rollout=OuterRef("pk"))
    moved = Rollout.objects.filter(Exists(live), pk=rollout_id, state__in=allowed).update(
        state=to, state_changed_at=timezone.now(), state_reason=reason[:300],
        state_changed_by=user if getattr(user, "pk", None) else None,
    )  # fmt: skip
    return bool(moved)


def _refused(rollout_id: int, verb: str) -> RolloutRefused:
    rollout = Rollout.objects.get(pk=rollout_id)
    if rollout.shown_state == "finished":
        return RolloutRefused(f"The {rollout} has finished: none of its nodes is left to be {verb}.")
    return RolloutRefused(f"The {rollout} is {rollout.get_state_display().lower()}: it cannot be {verb}.")


def pause(rollout_id: int, user: Any) -> None:
    """No node of it starts any more; started ones finish."""
    if not _move(rollout_id, PAUSE_FROM, RolloutState.PAUSED, f"paused by {user}", user):
        raise _refused(rollout_id, "paused")
    _record(Operation.ROLLOUT_PAUSE, rollout_id, user)


def resume(rollout_id: int, user: Any) -> None:
    """Its nodes start again: the ones that waited are woken once this commits."""
    if not _move(rollout_id, RESUME_FROM, RolloutState.RUNNING, f"resumed by {user}", user):
        raise _refused(rollout_id, "resumed")
    _record(Operation.ROLLOUT_RESUME, rollout_id, user)
    # Waiting for a resume was not silence: the reaper must not fail them before the wake.
    waiting = UpdateRun.objects.running().unstarted().filter(rollout_id=rollout_id)
    lifecycle.touch_all(list(waiting.values_list("pk", flat=True)))
    transaction.on_commit(WakeRollout(rollout_id))


def cancel(rollout_id: int, user: Any) -> int:
    """Call off its nodes that have not started (no lock; maintenance mode ends, as for a
    node left out of a plan); started ones finish. Returns how many runs were cancelled."""
    reason = f"its rollout was cancelled by {user}"
    if not _move(rollout_id, CANCEL_FROM, RolloutState.CANCELLED, f"cancelled by {user}", user):
        raise _refused(rollout_id, "cancelled")
    cancelled = cancel_unstarted(rollout_id, reason)
    _record(Operation.ROLLOUT_CANCEL, rollout_id, user, cancelled_runs=cancelled)
    return cancelled


def _record(operation: Operation, rollout_id: int, user: Any, **details: Any) -> None:
    """The operator's decision, in the audit trail (an automatic pause is the rollout's
    own: its reason is on its page)."""
    record(operation, Rollout.objects.select_related("cluster").get(pk=rollout_id), user=user, **details)


def cancel_unstarted(rollout_id: int, reason: str) -> int:
    from updates.runs.end import cancel_unstarted_run  # end builds on this module: imported when used

    waiting = UpdateRun.objects.running().unstarted().filter(rollout_id=rollout_id)
    # One transaction per run, as a plan's cancellation: each ends its node's maintenance mode.
    return sum(cancel_unstarted_run(run_id, reason) for run_id in waiting.values_list("pk", flat=True))


def pause_on_failures(rollout_id: int) -> bool:
    """A run of it failed: it pauses by itself once its failed runs reach its threshold
    (hawkBit's error threshold). Safe to run twice: a paused one stays paused."""
    rollout = Rollout.objects.with_progress().filter(pk=rollout_id, state=RolloutState.RUNNING).first()
    if rollout is None:
        return False
    done = rollout.progress
    if not rollout.threshold_reached(done.failed, done.total):
        return False
    reason = f"paused by itself after {rollout.threshold_display}: {done.failed} of its {done.total} nodes failed"
    if not _move(rollout_id, PAUSE_FROM, RolloutState.PAUSED, reason):
        return False
    log.warning("%s %s", rollout, reason)
    return True


# --- at a run's gate --------------------------------------------------------------------------


def at_gate(run: UpdateRun) -> str:
    """GO, WAIT (its rollout is paused: it waits, holding nothing, until resume wakes
    it) or CALLED_OFF (its rollout was cancelled: the run is cancelled, by this call or
    before it) for a run about to disrupt its node. One query by primary key, none for a
    run of no rollout."""
    if run.rollout_id is None:
        return GO
    state = Rollout.objects.filter(pk=run.rollout_id).values_list("state", flat=True).first()
    return _decide(run.pk, state)


def at_gates(runs: Iterable[UpdateRun]) -> dict[int, str]:
    """at_gate for many runs (a firing's update phases): one query for all their rollouts."""
    grouped = {run.pk: run.rollout_id for run in runs if run.rollout_id is not None}
    if not grouped:
        return {}
    states = dict(Rollout.objects.filter(pk__in=set(grouped.values())).values_list("pk", "state"))
    return {run_id: _decide(run_id, states.get(rollout_id)) for run_id, rollout_id in grouped.items()}


def _decide(run_id: int, state: str | None) -> str:
    if state == RolloutState.PAUSED:
        return WAIT
    if state == RolloutState.CANCELLED:
        from updates.runs.end import cancel_unstarted_run

        cancel_unstarted_run(run_id, "its rollout was cancelled")  # False: cancelled already
        return CALLED_OFF
    return GO


# --- waking its nodes on resume -----------------------------------------------------------------


@dataclass(frozen=True)
class WakeRollout:
    """Queues control.wake_rollout; transaction.on_commit calls it, a test can read it."""

    rollout_id: int

    def __call__(self) -> None:
        signature("control.wake_rollout", args=(self.rollout_id,)).set(queue=CONTROL_QUEUE).apply_async()


def wake(rollout_id: int) -> int:
    """Its nodes that waited while it was paused go on, as a released slot wakes the
    longest waiters: its clusters' lines are offered their free slots and places again
    (cluster_cap.wake_waiters, which skips nodes of paused rollouts), and its scheduled
    runs whose time has come begin their update phase. Runs whose time is still ahead
    keep their own timers. Safe to run twice. Returns how many went on."""
    from updates.runs.chains import start_update_phases  # both build on this module: imported when used
    from updates.runs.cluster_cap import wake_waiters

    in_line = UpdateStep.objects.in_line().filter(run__rollout_id=rollout_id).values("run__node__cluster")
    woken = sum(wake_waiters(cluster) for cluster in Cluster.objects.filter(pk__in=in_line))
    before = UpdateRun.objects.running().filter(
        rollout_id=rollout_id, trigger=UpdateRun.Trigger.SCHEDULED, update_phase_started=False
    )
    woken += len(start_update_phases(list(before.select_related("node__cluster", "release")), arm=False))
    return woken
