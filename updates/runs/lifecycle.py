"""The life of a run and of its steps: the one place where UpdateRun.state and
UpdateStep.state change.

Every transition is a conditional UPDATE from the states it allows (the *_FROM
sets) and says whether it moved anything: a duplicate or late message finds the
row moved on already and changes nothing. Callers hold the locks in the order
run, steps, node, so that two transactions never wait for each other the other
way round. A run is created running, its steps pending (updates.runs.start).

    run    succeed_run     running -> succeeded        control.complete
           fail_run        running -> failed           any failure, the reaper, verify's timeout
           cancel_run      running -> cancelled        an operator leaves the node out of a plan
                                                       (only before its update phase)
           cancel_unstarted_run  running -> cancelled  its rollout was cancelled (only before
                                                       the run disrupts its node)
    step   start_step      pending, running -> running                       a node step's start (again)
           wait_step       pending -> running                                slot, verify: their first attempt
           claim_step      running -> succeeded                              slot held, node back: who carries on
           finish_step     pending, running, succeeded, failed -> succeeded  a node's success report
                           pending, running, skipped, failed -> skipped      ... or skip report
           fail_step       pending, running -> failed                        a node's failure report
           abort_steps     running -> failed                                 the run failed
           complete_steps  pending, running -> succeeded                     the run completed
           retry_step_later pending, running -> pending                      a scheduled download's first failed round
           cancel_steps    pending, running -> skipped                       the run was cancelled
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import Case, F, IntegerField, Q, QuerySet, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from updates.models import UpdateRun, UpdateStep

RunState = UpdateRun.State
StepState = UpdateStep.State

# --- a run -----------------------------------------------------------------------------

SUCCEED_RUN_FROM = frozenset({RunState.RUNNING})
FAIL_RUN_FROM = frozenset({RunState.RUNNING})


def succeed_run(run_id: int, at: datetime) -> bool:
    """The run ends as succeeded (control.complete: the chain got there, so every step did)."""
    return bool(
        UpdateRun.objects.filter(pk=run_id, state__in=SUCCEED_RUN_FROM).update(state=RunState.SUCCEEDED, finished_at=at)
    )


def fail_run(run_id: int, reason: str, at: datetime) -> bool:
    """The run ends as failed, with the reason for the operator."""
    return bool(
        UpdateRun.objects.filter(pk=run_id, state__in=FAIL_RUN_FROM).update(
            state=RunState.FAILED, error=reason[:4000], finished_at=at
        )
    )


CANCEL_RUN_FROM = frozenset({RunState.RUNNING})


def cancel_run(run_id: int, reason: str, at: datetime) -> bool:
    """The run is called off before anything disruptive: only while its update phase
    has not begun (a scheduled run that downloaded, or is downloading)."""
    runs = UpdateRun.objects.filter(pk=run_id, state__in=CANCEL_RUN_FROM, update_phase_started=False)
    return bool(runs.update(state=RunState.CANCELLED, error=reason[:4000], finished_at=at))


CANCEL_UNSTARTED_FROM = frozenset({RunState.RUNNING})


def cancel_unstarted_run(run_id: int, reason: str, at: datetime) -> bool:
    """The run is called off before it disrupts its node (UpdateRunQuerySet.unstarted: a
    scheduled run before its update phase, a cluster node before its first gate)."""
    runs = UpdateRun.objects.filter(pk=run_id, state__in=CANCEL_UNSTARTED_FROM).unstarted()
    return bool(runs.update(state=RunState.CANCELLED, error=reason[:4000], finished_at=at))


def touch(run_id: int, at: datetime | None = None) -> bool:
    """A running run shows activity (the reaper and the reconciler look for quiet
    ones). No state changes; False if the run has ended."""
    return bool(UpdateRun.objects.running().filter(pk=run_id).update(last_activity_at=at or timezone.now()))


def touch_all(run_ids: list[int], at: datetime | None = None) -> int:
    """touch for many runs in one UPDATE (a firing's runs resting until their time);
    returns how many are still running."""
    if not run_ids:
        return 0
    return int(UpdateRun.objects.running().filter(pk__in=run_ids).update(last_activity_at=at or timezone.now()))


# --- a step ----------------------------------------------------------------------------

# A node step starts, or starts again: the agent restarted mid-step and the run was
# queued again from it. A finished step is never reopened (reports arrive out of order).
START_FROM = frozenset({StepState.PENDING, StepState.RUNNING})
# A control step that waits (slot: in line; verify: for the node) begins its first
# attempt; its retries are that same attempt.
WAIT_FROM = frozenset({StepState.PENDING})
# A waiting control step ends. Whoever moves it carries the run on: the claim.
CLAIM_FROM = frozenset({StepState.RUNNING})
# A node reports its step done. A late report still lands: on a step that complete
# marked succeeded meanwhile (the report brings the node's own times and detail), and
# on a step that failed with its run (the reaper, a timeout) but did succeed on the node.
SUCCEED_FROM = frozenset({StepState.PENDING, StepState.RUNNING, StepState.SUCCEEDED, StepState.FAILED})
SKIP_FROM = frozenset({StepState.PENDING, StepState.RUNNING, StepState.SKIPPED, StepState.FAILED})
# A node reports its step failed; the run fails with it.
FAIL_FROM = frozenset({StepState.PENDING, StepState.RUNNING})
# The run failed: its running step fails with it.
ABORT_FROM = frozenset({StepState.RUNNING})
# The run completed: the chain only gets there if every step succeeded, so a step
# whose own report was lost must not stay pending or running.
COMPLETE_FROM = frozenset({StepState.PENDING, StepState.RUNNING})
# A scheduled run's failed download round: the step waits for the second round.
RETRY_LATER_FROM = frozenset({StepState.PENDING, StepState.RUNNING})

OUTCOMES = {"succeeded": (StepState.SUCCEEDED, SUCCEED_FROM), "skipped": (StepState.SKIPPED, SKIP_FROM)}


def _step(run_id: int, name: str, allowed: frozenset[str]) -> QuerySet[UpdateStep]:
    return UpdateStep.objects.filter(run_id=run_id, name=name, state__in=allowed)


def start_step(run_id: int, name: str, at: datetime, **fields: Any) -> bool:
    """A node step (or hold) reports its start: one more attempt."""
    return bool(
        _step(run_id, name, START_FROM).update(
            state=StepState.RUNNING, started_at=at, attempts=F("attempts") + 1, **fields
        )
    )


def wait_step(run_id: int, name: str, at: datetime) -> bool:
    """A control step of a running run begins to wait (slot, verify)."""
    steps = _step(run_id, name, WAIT_FROM).filter(run__state=RunState.RUNNING)
    return bool(steps.update(state=StepState.RUNNING, started_at=at, attempts=1))


def claim_step(run_id: int, name: str, at: datetime, detail: str) -> bool:
    """A waiting control step succeeds; True for the one caller that moved it."""
    return bool(_step(run_id, name, CLAIM_FROM).update(state=StepState.SUCCEEDED, finished_at=at, detail=detail))


def finish_step(run_id: int, name: str, outcome: str, at: datetime, *, began: datetime | None, **fields: Any) -> bool:
    """A node reports its step succeeded or skipped. `began`: when it started, if the
    outcome is the step's only report (a quick step, or its start report still queued)."""
    state, allowed = OUTCOMES[outcome]
    return bool(_step(run_id, name, allowed).update(state=state, finished_at=at, **_began(began or at), **fields))


def fail_step(run_id: int, name: str, at: datetime, *, began: datetime | None, **fields: Any) -> bool:
    """A node reports its step failed (the caller fails the run)."""
    return bool(
        _step(run_id, name, FAIL_FROM).update(state=StepState.FAILED, finished_at=at, **_began(began), **fields)
    )


def abort_steps(run_id: int, at: datetime) -> int:
    """The run failed: its running step fails with it."""
    return UpdateStep.objects.filter(run_id=run_id, state__in=ABORT_FROM).update(state=StepState.FAILED, finished_at=at)


def complete_steps(run_id: int, at: datetime) -> int:
    """The run completed: steps whose own report was lost count as succeeded (a report
    that arrives later still lands, see SUCCEED_FROM)."""
    return UpdateStep.objects.filter(run_id=run_id, state__in=COMPLETE_FROM).update(
        state=StepState.SUCCEEDED, finished_at=at
    )


CANCEL_STEPS_FROM = frozenset({StepState.PENDING, StepState.RUNNING})


def cancel_steps(run_id: int) -> int:
    """The run was cancelled: what it had not done, it never will."""
    return UpdateStep.objects.filter(run_id=run_id, state__in=CANCEL_STEPS_FROM).update(state=StepState.SKIPPED)


def retry_step_later(run_id: int, name: str, detail: str) -> bool:
    """The step goes back to pending, to be queued again later (the download policy)."""
    return bool(_step(run_id, name, RETRY_LATER_FROM).update(state=StepState.PENDING, detail=detail))


def _began(began: datetime | None) -> dict[str, Any]:
    """A step that was never announced as started: its start (if known) and its attempt."""
    if began is None:
        return {}
    first = Q(started_at__isnull=True)
    return {
        "started_at": Coalesce("started_at", Value(began)),
        "attempts": Case(When(first, then=F("attempts") + 1), default=F("attempts"), output_field=IntegerField()),
    }
