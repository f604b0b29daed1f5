"""The cluster's two bounds: at most `max_parallel_updates` nodes updating (from
logging their users off to back in service) and at most `out_of_lb_bound` out of
the load balancer at once. Each is a semaphore in Redis (updates/slots.py, with
fencing tokens): a node takes a *place* out of the load balancer (the `leave`
step, scheduled runs only) before it leaves it, and an update *slot* (the `slot`
step) before its users are logged off, or waits in line in the database; a
release hands both on to the longest waiters in place."""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agent.shared.protocol import OUT_PREFIX
from nodes.models import Cluster, Node
from updates.models import PlanEntry, UpdateRun, UpdateStep
from updates.runs import lifecycle, rollouts
from updates.runs.chains import LONGEST_NAP, RunFailed, queue_from, step_states
from updates.slots import ClusterSlots, shared_slots


class SlotWait(Exception):
    """Every update slot of the cluster is taken: the node waits in line (it does not fail)."""


class RolloutPaused(SlotWait):
    """The node's rollout is paused: it waits in line, holding nothing, until its resume."""


class HoldOn(Exception):
    """The node's update time has not come yet: retried after `seconds`."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds


def cluster_slots() -> ClusterSlots:
    return shared_slots(settings.REDIS_URL, sentinel=settings.REDIS_SENTINEL)


def out_places() -> ClusterSlots:
    return shared_slots(settings.REDIS_URL, OUT_PREFIX, settings.REDIS_SENTINEL)


def _semaphore(step: str, cluster: Cluster) -> tuple[ClusterSlots, int, str]:
    if step == "leave":
        return out_places(), cluster.out_of_lb_bound, "places out of the load balancer"
    return cluster_slots(), cluster.max_parallel_updates, "update slots"


def take_slot(run_id: int, step: str = "slot", *, ahead: bool = False, loaded: UpdateRun | None = None) -> bool:
    """Hold one of the cluster's update slots (`slot`) or places out of the load
    balancer (`leave`), then queue the rest of the run; an update slot's fencing
    token goes into the rest's payload. SlotWait while all are taken. True if this
    call took it.

    `ahead`: a holding node's update slot before its planned time (hold): taken only if
    one is free now and nobody waits in line for it, and its hold ends with it; otherwise
    nothing changes (no line, no replan: its hold goes on) and False. `loaded`: the run,
    read by the caller in this task with its node, cluster and release (the hold's).

    On the slot's critical path when a release hands it to the next waiter
    (wake_waiters): two reads, one transaction of two writes, and the chain queued
    from the objects at hand."""
    run = loaded or UpdateRun.objects.select_related("node__cluster", "release").get(pk=run_id)
    names, states = zip(*step_states(run), strict=True)
    state = states[names.index(step)]
    if run.state != UpdateRun.State.RUNNING or state == UpdateStep.State.SUCCEEDED:
        return False  # ended, or a duplicate of a step that already went on
    if run.release.withdrawn_at is not None:
        from updates.runs.end import fail_run  # end builds on this module: imported when used

        fail_run(run_id, run.release.withdrawn_reason)  # before it leaves the load balancer or logs anyone off
        return False
    if ahead:
        # Its rollout was asked at its first gate (leave): a node out of the load balancer is started.
        if UpdateStep.objects.in_line().filter(run__node__cluster=run.node.cluster_id, name=step).exists():
            return False  # a free slot is theirs (a release hands it on): it never passes a node in line
    else:
        if state == UpdateStep.State.PENDING:
            lifecycle.wait_step(run_id, step, timezone.now())
        # Asked only once in line (above): a resume from now on finds it there and wakes it.
        if step == next(name for name in names if name in UpdateStep.GATES) and _held(run, step):
            return False
    cluster, node = run.node.cluster, run.node
    assert cluster is not None
    semaphore, bound, what = _semaphore(step, cluster)
    token = semaphore.acquire(cluster.name, node.hostname, bound)
    if token is None:
        if ahead:
            return False
        holders = ", ".join(h.node for h in semaphore.holders(cluster.name))
        # No last_activity_at: the reaper and the reconciler leave waiting runs alone.
        UpdateStep.objects.filter(run_id=run_id, name=step).update(
            detail=f"waiting in line: all {bound} {what} were taken ({holders})"
        )
        if step == "slot":
            _replan(run)  # its time has come and gone: it and the nodes after it move
        raise SlotWait(f"{node} waits for one of the {what} of {cluster}")
    # Stamped once held, not when asked: the slot may have been freed in between, and
    # the step's end must never come before the release that made room for it.
    held_at = timezone.now()
    with transaction.atomic():
        # The run's row before its step's (run, steps, node), as a cancellation locks them.
        fields = {"slot_token": token} if step == "slot" else {}
        ended = not UpdateRun.objects.running().filter(pk=run_id).update(last_activity_at=held_at, **fields)
        if not ended and ahead:
            lifecycle.finish_step(run_id, "hold", "succeeded", held_at, began=None)
            lifecycle.wait_step(run_id, step, held_at)
        if not ended:
            if not lifecycle.claim_step(run_id, step, held_at, f"held, token {token}"):
                return False  # a duplicate was faster
            if step == "slot":
                run.slot_token = token
            # Named, not "the first unfinished step": an earlier step's report may still be queued.
            queue_from(run, names[names.index(step) + 1], names=names)
    if ended:
        _give_back(run_id, cluster, node, step, token)  # not carried on
        return False
    return True


def _held(run: UpdateRun, step: str) -> bool:
    """At its first gate: whether its rollout keeps the node from starting (RolloutPaused
    while paused) or called it off (True: nothing more to do)."""
    gate = rollouts.at_gate(run)
    if gate == rollouts.WAIT:
        # No last_activity_at: a waiting run is not silent (the reaper, the reconciler).
        UpdateStep.objects.filter(run_id=run.pk, name=step).update(
            detail=f"waiting: its rollout {run.rollout_id} is paused"
        )
        raise RolloutPaused(f"{run.node} waits for its rollout {run.rollout_id} to resume")
    return gate == rollouts.CALLED_OFF


def _give_back(run_id: int, cluster: Cluster, node: Node, step: str, token: int) -> None:
    """A run that ended while it took a slot or place: a failed one keeps it until its
    maintenance ends; a cancelled one never disrupted its node, so it goes to the next waiter."""
    if not UpdateRun.objects.filter(pk=run_id, state=UpdateRun.State.CANCELLED).exists():
        return
    semaphore, _, _ = _semaphore(step, cluster)
    if semaphore.release(cluster.name, node.hostname, token if step == "slot" else None):
        wake_waiters(cluster)


def hold(run_id: int) -> None:
    """Out of the load balancer, a cluster node keeps its users until its planned time
    (its plan entry, which an overrun before it may move: looked at again every
    TGP_PLAN_LOOK seconds while another node of the plan updates, plans.next_look).
    From TGP_DRAIN_AHEAD before that time it takes an update slot that is free, and its
    drain goes ahead to wait on the node for the time. HoldOn until then; at its time it
    takes the update slot (take_slot), or waits in line."""
    from updates import plans  # plans build on runs: imported when used

    run = UpdateRun.objects.select_related("node__cluster", "release").get(pk=run_id)
    if run.state != UpdateRun.State.RUNNING:
        raise RunFailed(f"run {run_id} is {run.state}")
    now = timezone.now()
    lifecycle.touch(run_id, now)
    entry = plans.entry_for(run)
    if entry is not None:
        # Within the lead, a free slot now: its drain goes to the node, which logs its
        # users off at their time by its own clock (agent.steps.until_logoff). No look at
        # the plan first: every node due before it holds a slot already, so none of them
        # can overrun into the one it takes, and its time, once it holds one, is kept.
        ahead = _ahead_at(entry) <= now < entry.planned_at and plans.turn_comes_first(entry)
        if ahead and take_slot(run_id, "slot", ahead=True, loaded=run):
            return
        look = plans.next_look(entry, now)
        if look is None:
            # A node before it that overruns moves its time (and its users hear of it) first.
            plans.replan(entry.plan, now)
            entry.refresh_from_db(fields=["planned_at"])
            look = now + timedelta(seconds=settings.TGP_PLAN_LOOK)
        if now < entry.planned_at:
            detail = f"users are logged off at {timezone.localtime(entry.planned_at):%H:%M:%S}"
            lifecycle.start_step(run_id, "hold", now, detail=detail)
            ahead_at = _ahead_at(entry)  # again: a replan may have moved it
            wake = ahead_at if now < ahead_at else entry.planned_at
            wait = (min(wake, look) - now).total_seconds()
            raise HoldOn(f"run {run_id} holds until {wake}", min(wait, LONGEST_NAP))
    lifecycle.finish_step(run_id, "hold", "succeeded", now, began=None)
    # Its time has come: the slot at once, in this task. Handed on as a task of its own,
    # the request waited behind the whole control queue at the very time the node's
    # users were to be logged off (a fleet-wide update: 10-45 s, bench/fleet_update.py).
    with contextlib.suppress(SlotWait):  # in line: a release hands it on (wake_waiters)
        take_slot(run_id, "slot")


def _ahead_at(entry: PlanEntry) -> datetime:
    """From when a holding node may take a free slot and send its drain ahead (TGP_DRAIN_AHEAD)."""
    return entry.planned_at - timedelta(seconds=settings.TGP_DRAIN_AHEAD)


def _replan(run: UpdateRun) -> None:
    from updates import plans

    entry = plans.entry_for(run)
    if entry is not None:
        plans.replan(entry.plan)


def release_slot(node: Node, token: int | None = None) -> None:
    """Free the node's update slot and its place out of the load balancer (once it is
    back in service) and wake the next waiters."""
    cluster = node.cluster
    if cluster is None:
        return
    freed = cluster_slots().release(cluster.name, node.hostname, token) or token is None
    freed = out_places().release(cluster.name, node.hostname) or freed
    if freed:
        wake_waiters(cluster)


def wake_waiters(cluster: Cluster) -> int:
    """Offer the cluster's free places and slots to its waiting nodes, longest waiter
    first; each is taken here, in place, and the run's next steps are queued. A
    waiting node has no task of its own (control.leave and control.slot end when all
    are taken): it goes on when a release calls this, or when the reconciler does,
    should a release have been lost. Returns how many waiters went on."""
    # One query for both lines, longest waiter first (a line is a cluster's nodes at most);
    # nodes of a paused rollout wait for its resume, they take no free slot from those behind them.
    line = UpdateStep.objects.in_line().filter(run__node__cluster=cluster).order_by("started_at")
    line = line.exclude(run__in=UpdateRun.objects.held_by_pause().values("pk"))
    waiters = list(line.values_list("name", "run_id", "run__node__hostname"))
    woken = 0
    for step in ("leave", "slot"):
        waiting = [(run_id, host) for name, run_id, host in waiters if name == step]
        if not waiting:
            continue
        semaphore, bound, _ = _semaphore(step, cluster)
        held = {h.node for h in semaphore.holders(cluster.name)}
        # A waiter whose node holds one already (its step was cut short after taking
        # it) goes first: it counts against the bound, and no release would wake it.
        holding = [run_id for run_id, host in waiting if host in held]
        free = max(bound - len(held), 0)
        first = [run_id for run_id, host in waiting if host not in held][:free]
        for run_id in holding + first:
            try:
                take_slot(run_id, step)
            except SlotWait:  # another hand-off was faster: this one keeps its place in line
                continue
            woken += 1
    return woken
