"""What carries a run on when a message was lost: an agent that restarted mid-step
(node_reported queues the run again), a control worker killed while it held a
message (the reconciler), and a node gone silent (the reaper fails its run)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from agent.shared.protocol import CONTROL_STEPS, NODE_STEPS
from nodes.models import Cluster, Node
from updates.models import UpdateRun, UpdateStep
from updates.runs import lifecycle
from updates.runs.chains import logoff_at, pending_step, queue_from, start_update_phase, waiting
from updates.runs.cluster_cap import wake_waiters
from updates.runs.end import complete_run, fail_run
from updates.runs.snapshots import STORED_FIELDS, apply_snapshot, store_heartbeat
from updates.runs.verify import wake_verify

log = logging.getLogger(__name__)


def node_reported(
    hostname: str, snapshot: dict[str, Any], seq: int = 0, *, stored: dict[str, Any] | None = None
) -> None:
    """A heartbeat. If the agent restarted in the middle of a run (a crash, not
    the reboot step), queue the run again from the step it was in (chains.resume_point): every
    node step is safe to run twice."""
    before = stored if stored is not None else Node.objects.filter(hostname=hostname).values(*STORED_FIELDS).first()
    if store_heartbeat(hostname, before, snapshot, seq):
        return  # nothing changed: the same agent instance, no restart either
    node = apply_snapshot(hostname, snapshot, seq)
    if node is not None and snapshot.get("worker"):
        wake_verify(node)
    if (
        node is None
        or before is None
        or not before["agent_instance"]
        or before["agent_instance"] == node.agent_instance
    ):
        return
    if before["boot_id"] != node.boot_id:
        return  # this restart is a reboot (the run's own): the chain goes on by itself
    run = UpdateRun.objects.running().filter(node=node).first()
    if run is None:
        return
    pending = pending_step(run)
    if pending is None or pending.name not in NODE_STEPS:
        return
    if pending.state == UpdateStep.State.PENDING and waiting(run):
        return  # a scheduled run between its two phases: nothing is lost
    log.warning("agent of %s restarted during run %s: resuming at %s", hostname, run.pk, pending.name)
    queue_from(run, pending.name)


def reconcile() -> int:
    """Carry on runs whose chain was lost: a control worker killed while it held a
    message (control tasks are acknowledged on receipt, and Redis would only
    redeliver after its visibility timeout). Every step it queues is safe to run
    twice. Returns how many runs it touched."""
    cutoff = timezone.now() - timedelta(seconds=settings.TGP_RECONCILE_AFTER)
    touched = 0
    in_line = UpdateStep.objects.in_line()
    # Runs held by a paused rollout wait for its resume, which carries them on.
    held = UpdateRun.objects.held_by_pause().values("pk")
    quiet = UpdateRun.objects.running().filter(last_activity_at__lt=cutoff).exclude(pk__in=held)
    # A node waiting in line is not lost, and may wait long: not walked one by one here.
    for run in quiet.exclude(pk__in=in_line.values("run_id")).select_related("node__cluster", "release"):
        touched += _carry_on(run, cutoff)
    # Waiting nodes have no task that retries: free slots are offered again here.
    for cluster in Cluster.objects.filter(pk__in=in_line.values("run__node__cluster")):
        touched += wake_waiters(cluster)
    return touched


def _carry_on(run: UpdateRun, cutoff: datetime) -> bool:
    if run.trigger == UpdateRun.Trigger.SCHEDULED and not run.update_phase_started:
        # Now if its time has come; a cluster node's timer again if not (a lost timer
        # message delays nothing; single systems all start at the update entry).
        return start_update_phase(run.pk, arm=run.node.cluster_id is not None)
    if waiting(run):
        return False
    pending = pending_step(run)
    if pending is None:
        return complete_run(run.pk)
    if pending.name == "reboot" and run.release.needs_reboot and run.node.boot_id != run.boot_id_before:
        # The node rebooted, but neither the reboot step's report nor the chain's verify
        # reached us (a control worker or Redis went down holding them): verify goes on.
        log.warning("run %s: %s rebooted, its reboot step was never reported: carrying on at verify", run.pk, run.node)
        lifecycle.touch(run.pk)
        queue_from(run, "verify")
        return True
    logoff = logoff_at(run) if pending.name == "drain" else None
    if logoff is not None and logoff > cutoff.timestamp():
        return False  # its drain went ahead and waits on the node for its users' time (hold)
    agent_alive = run.node.last_seen is not None and run.node.last_seen > cutoff
    lost_node_step = pending.name in NODE_STEPS and pending.state == UpdateStep.State.PENDING and agent_alive
    if pending.name in CONTROL_STEPS or lost_node_step:
        log.warning("run %s was quiet since %s: carrying on at %s", run.pk, run.last_activity_at, pending.name)
        lifecycle.touch(run.pk)
        queue_from(run, pending.name)
        return True
    return False


def reap_stale_runs() -> int:
    """Fail runs whose node went silent for longer than TGP_RUN_STALL_TIMEOUT."""
    cutoff = timezone.now() - timedelta(seconds=settings.TGP_RUN_STALL_TIMEOUT)
    failed = 0
    stale = (
        UpdateRun.objects.running()
        .filter(last_activity_at__lt=cutoff)
        .filter(Q(scheduled_for__isnull=True) | Q(scheduled_for__lt=cutoff))  # may rest until its update time
        .exclude(pk__in=UpdateStep.objects.in_line().values("run_id"))  # waiting in line is not silence
        .exclude(pk__in=UpdateRun.objects.held_by_pause().values("pk"))  # nor waiting for a rollout's resume
    )
    for run_id in stale.values_list("pk", flat=True):
        reason = f"no word from the node for {settings.TGP_RUN_STALL_TIMEOUT:.0f} s"
        failed += fail_run(run_id, reason)
    return failed
