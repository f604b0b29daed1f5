"""The cluster cap: at most `max_parallel_updates` nodes of a cluster out of
service at once. A node takes one of the cluster's slots (updates/slots.py: a
semaphore in Redis with fencing tokens) or waits in line in the database; a
release hands the slot on to the longest waiter in place."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from nodes.models import Cluster, Node
from updates.models import UpdateRun, UpdateStep
from updates.runs import lifecycle
from updates.runs.chains import RunFailed, queue_from
from updates.slots import ClusterSlots, shared_slots


class SlotWait(Exception):
    """Every update slot of the cluster is taken: the node waits in line (it does not fail)."""


class HoldOn(Exception):
    """The load-balancer lead time has not passed yet (retried)."""


def cluster_slots() -> ClusterSlots:
    return shared_slots(settings.REDIS_URL)


def take_slot(run_id: int) -> None:
    """Hold one of the cluster's update slots, then queue the rest of the run with
    the slot's fencing token. SlotWait while the cluster is full.

    On the slot's critical path when a release hands it to the next waiter
    (wake_waiters): two reads, one transaction of two writes, and the chain queued
    from the objects at hand."""
    run = UpdateRun.objects.select_related("node__cluster", "release").get(pk=run_id)
    names, states = zip(*run.steps.order_by("position").values_list("name", "state"), strict=True)
    state = states[names.index("slot")]
    if run.state != UpdateRun.State.RUNNING or state == UpdateStep.State.SUCCEEDED:
        return  # ended, or a duplicate of a slot step that already went on
    if state == UpdateStep.State.PENDING:
        lifecycle.wait_step(run_id, "slot", timezone.now())
    cluster, node = run.node.cluster, run.node
    assert cluster is not None
    token = cluster_slots().acquire(cluster.name, node.hostname, cluster.max_parallel_updates)
    if token is None:
        holders = ", ".join(h.node for h in cluster_slots().holders(cluster.name))
        # No last_activity_at: the reaper and the reconciler leave waiting runs alone.
        UpdateStep.objects.filter(run_id=run_id, name="slot").update(
            detail=f"waiting in line: all {cluster.max_parallel_updates} slots were taken ({holders})"
        )
        raise SlotWait(f"{node} waits for an update slot of {cluster}")
    # Stamped once held, not when asked: the slot may have been freed in between, and
    # the step's end must never come before the release that made room for it.
    held_at = timezone.now()
    with transaction.atomic():
        if not lifecycle.claim_step(run_id, "slot", held_at, f"slot held, fencing token {token}"):
            return  # a duplicate was faster
        drain_at = max(run.scheduled_for, held_at + cluster.lb_lead_time) if run.scheduled_for else None
        if (
            not UpdateRun.objects.running()
            .filter(pk=run_id)
            .update(slot_token=token, drain_not_before=drain_at, last_activity_at=held_at)
        ):
            return  # ended meanwhile: not carried on; its node keeps the slot until maintenance ends
        run.slot_token = token
        # Named, not "the first unfinished step": an earlier step's report may still be queued.
        queue_from(run, names[names.index("slot") + 1], names=names)


def hold(run_id: int) -> None:
    """Out of the load balancer, a cluster node keeps its users for the lead time."""
    run = UpdateRun.objects.get(pk=run_id)
    if run.state != UpdateRun.State.RUNNING:
        raise RunFailed(f"run {run_id} is {run.state}")
    now = timezone.now()
    lifecycle.touch(run_id, now)
    if run.drain_not_before and now < run.drain_not_before:
        lifecycle.start_step(run_id, "hold", now, detail=f"users are logged off at {run.drain_not_before:%H:%M:%S}")
        raise HoldOn(f"run {run_id} holds until {run.drain_not_before}")
    lifecycle.finish_step(run_id, "hold", "succeeded", now, began=None)


def release_slot(node: Node, token: int | None = None) -> None:
    """Free the node's slot (once it is back in service) and wake the next waiter."""
    cluster = node.cluster
    if cluster is None:
        return
    if cluster_slots().release(cluster.name, node.hostname, token) or token is None:
        wake_waiters(cluster)


def wake_waiters(cluster: Cluster) -> int:
    """Offer the cluster's free slots to its waiting nodes, longest waiter first; the
    slot is taken here, in place, and the run's next steps are queued. A waiting
    node has no task of its own (control.slot ends when the cluster is full): it
    goes on when a release calls this, or when the reconciler does, should a
    release have been lost. Returns how many waiters went on."""
    held = {h.node for h in cluster_slots().holders(cluster.name)}
    waiting = UpdateStep.objects.in_line().filter(run__node__cluster=cluster).order_by("started_at")
    # A waiter whose node holds a slot already (its slot step was cut short after
    # taking one) goes first: it counts against the cap, and no release would wake it.
    holding = list(waiting.filter(run__node__hostname__in=held).values_list("run_id", flat=True))
    free = max(cluster.max_parallel_updates - len(held), 0)
    first = list(waiting.exclude(run__node__hostname__in=held).values_list("run_id", flat=True)[:free])
    woken = 0
    for run_id in holding + first:
        try:
            take_slot(run_id)
        except SlotWait:  # another hand-off was faster: this one keeps its place in line
            continue
        woken += 1
    return woken
