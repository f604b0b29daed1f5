"""How a run ends: complete (succeeded, maintenance mode off, the slot to the next
waiter) or failed (the node locked and left in maintenance mode)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from nodes.models import Node
from updates.models import UpdateRun
from updates.runs import lifecycle, rollouts
from updates.runs.cluster_cap import release_slot
from updates.runs.locks import set_lock
from updates.runs.snapshots import store_snapshot

log = logging.getLogger(__name__)


def complete_run(run_id: int, snapshot: dict[str, Any] | None = None, seq: int = 0) -> bool:
    """Mark an error-free run succeeded and end the node's maintenance mode.
    `snapshot`: the node's state after resume, handed on by the chain, so that the
    node shows logon on and back in the load balancer when the run shows succeeded
    (`seq`: its place in the node's signed sequence).
    One transaction; then the node's slot goes to the next waiter."""
    with transaction.atomic():
        now = timezone.now()
        if not lifecycle.succeed_run(run_id, now):
            return False
        run = UpdateRun.objects.select_related("node__cluster").get(pk=run_id)
        # The chain reaches this point only after every step succeeded: a step whose
        # own report was lost (a control worker killed, or an agent killed between the
        # chain's next message and the report, see agent.tasks.NodeStep) must not show
        # as running or pending. A report that arrives later still lands on its step.
        lifecycle.complete_steps(run_id, now)
        if snapshot:  # the node's row last, as everywhere (run, steps, node): no deadlock
            store_snapshot(run.node.hostname, snapshot, seq)
        if run.trigger == UpdateRun.Trigger.DOWNLOAD:  # it never touched maintenance mode or a slot
            log.info("run %s (download only) succeeded", run_id)
            return True
        Node.objects.filter(pk=run.node_id).update(maintenance_mode=False, maintenance_reason="")
    release_slot(run.node, run.slot_token)
    log.info("run %s succeeded", run_id)
    return True


def fail_run(run_id: int, reason: str) -> bool:
    """End the run as failed and lock the node. The node stays in maintenance:
    only an error-free run ends it (the manual's rule), and a failed cluster node
    keeps its slot until then. Returns False if the run had ended already."""
    with transaction.atomic():
        now = timezone.now()
        if not lifecycle.fail_run(run_id, reason, now):
            return False
        run = UpdateRun.objects.select_related("node").get(pk=run_id)
        lifecycle.abort_steps(run_id, now)
        set_lock(run.node, f"Update to run {run_id} failed: {reason}", run=run)
    log.error("run %s failed: %s", run_id, reason)
    if run.rollout_id is not None:
        rollouts.pause_on_failures(run.rollout_id)  # last: a rollout's row is locked after its runs', never before
    return True


def cancel_run(run_id: int, reason: str) -> bool:
    """Call a scheduled run off before its update phase (an operator left its node out
    of the plan): no lock; maintenance mode ends, on the appliance too. False if the
    run has ended or its update phase has begun."""
    return _cancel(run_id, reason, lifecycle.cancel_run)


def cancel_unstarted_run(run_id: int, reason: str) -> bool:
    """Call a run off before it disrupts its node (its rollout was cancelled), as a plan's
    cancel_run does. False if the run has ended or started."""
    return _cancel(run_id, reason, lifecycle.cancel_unstarted_run)


def _cancel(run_id: int, reason: str, transition: Callable[[int, str, datetime], bool]) -> bool:
    # The operator's own action, with the agent's command; its audit row is the call-off's.
    from nodes.services import leave_maintenance

    with transaction.atomic():
        # The run's row first (run, steps, node): a slot being claimed for it meanwhile
        # (cluster_cap.take_slot) commits before the transition looks at its steps.
        list(UpdateRun.objects.select_for_update().filter(pk=run_id).values_list("pk"))
        if not transition(run_id, reason, timezone.now()):
            return False
        run = UpdateRun.objects.select_related("node").get(pk=run_id)
        lifecycle.cancel_steps(run_id)
        leave_maintenance(run.node)
    log.info("run %s cancelled: %s", run_id, reason)
    return True
