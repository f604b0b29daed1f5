"""Control-queue tasks: thin wrappers that take a signed message (checked by
updates.trust, decoded by agent.shared.protocol) or ids, and call the plain
functions of updates.runs."""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime
from typing import Any

from celery import shared_task
from celery.signals import worker_ready
from django.conf import settings

from agent.shared.protocol import (
    COMPLETE,
    CONTROL_QUEUE,
    ENROLL,
    NODE_REPORT,
    RECORD_STEP,
    VERIFY,
    NodeReport,
    ProtocolError,
    StepReport,
    control_task,
)
from nodes import keys
from nodes.models import Node
from updates import trust
from updates.runs import chains, cluster_cap, end, recovery, reports, rollouts
from updates.runs import verify as verification
from updates.runs.snapshots import STORED_FIELDS

log = logging.getLogger(__name__)


def _from_node(
    envelope: Any, kind: str, message_type: type[Any], node_fields: tuple[str, ...] = ()
) -> tuple[str, int, Any, bool, dict[str, Any]] | None:
    """(node, seq, message, whether the run it names is the node's, the node's
    `node_fields` as stored) of a message a node signed with its accepted key, checked
    field by field; None (and a log line) otherwise: it changes nothing, and retrying
    it would not help."""
    try:
        node, body, owns_run, stored = trust.from_node(envelope, kind, node_fields=node_fields)
        return node, body["seq"], message_type.from_wire(body.get("message")), owns_run, stored
    except ProtocolError as exc:
        log.warning("refused a %s: %s", kind, exc)
        return None


@shared_task(name=RECORD_STEP, ignore_result=True)
def record_step(envelope: dict[str, Any]) -> None:
    found = _from_node(envelope, "report", StepReport)
    if found is None:
        return
    node, seq, report, owns_run, _ = found
    # A node speaks for itself only: about its own runs, under its own name.
    if report.hostname != node or not owns_run:
        log.warning("refused a report of %s about run %s of another node", node, report.run)
        return
    reports.record_step(
        report.run, report.step, report.event, detail=report.detail, bytes_done=report.bytes_done,
        bytes_total=report.bytes_total, snapshot=report.snapshot.to_wire() if report.snapshot else None,
        hostname=node, at=report.at, started=report.started, seq=seq,
    )  # fmt: skip


# A worker's ready report (the supervisors' heartbeats come in batches instead:
# updates/heartbeats.py). No task events: its effect is on the node's page; a refused one is logged.
@shared_task(name=NODE_REPORT, ignore_result=True, send_events=False)
def node_report(envelope: dict[str, Any]) -> None:
    # The node's stored state comes with its key: what a restart mid-run is told by.
    found = _from_node(envelope, "node_report", NodeReport, STORED_FIELDS)
    if found is None:
        return
    node, seq, report, _, stored = found
    if report.hostname != node:
        log.warning("refused a report of %s about %s", node, report.hostname)
        return
    recovery.node_reported(node, report.snapshot.to_wire(), seq, stored=stored)


@shared_task(name=ENROLL, ignore_result=True)
def enroll(envelope: dict[str, Any]) -> None:
    """A node's agent offers its key; an operator accepts it on the node's page."""
    try:
        hostname, public_key = trust.offered_key(envelope)
    except ProtocolError as exc:
        log.warning("refused a key offer: %s", exc)
        return
    node = Node.objects.filter(hostname=hostname).first()
    if node is None:
        log.warning("a key offer of %s, which is not in the fleet, ignored", hostname)
    elif keys.offer(node, public_key):
        log.info("%s offers a new key; an operator may accept it on the node's page", hostname)


@shared_task(
    name=VERIFY,
    autoretry_for=(verification.NodeNotBack,),
    throws=(verification.CarriedOn,),  # expected: logged without a traceback
    retry_backoff=1,
    retry_backoff_max=3,
    retry_jitter=False,
    max_retries=None,  # bounded by TGP_REBOOT_TIMEOUT inside verify_node_back
)
def verify(handoff: dict[str, Any]) -> None:
    # handoff: what node.reboot (or node.install) returned, signed by the node, or a go
    # of the control plane's (updates.trust.accepted_handoff).
    accepted = trust.accepted_handoff(handoff, "verify")
    if accepted is not None:
        verification.verify_node_back(accepted.run, accepted.snapshot, accepted.seq)


def _take(handoff: dict[str, Any], step: str) -> None:
    # No retry while all are taken: the node waits in line in the database, and a
    # release hands on at once (cluster_cap.wake_waiters). A retry per waiter would be
    # control-queue traffic that grows with the cluster.
    accepted = trust.accepted_handoff(handoff, step)
    if accepted is not None:
        with contextlib.suppress(cluster_cap.SlotWait):
            cluster_cap.take_slot(accepted.run, step)


@shared_task(name=control_task("slot"))  # sent at SLOT_PRIORITY (agent.shared.protocol)
def slot(handoff: dict[str, Any]) -> None:
    _take(handoff, "slot")


@shared_task(name=control_task("leave"))
def leave(handoff: dict[str, Any]) -> None:
    _take(handoff, "leave")


@shared_task(bind=True, name=control_task("hold"), max_retries=None)  # bounded by the node's planned time
def hold(self: Any, handoff: dict[str, Any]) -> None:
    accepted = trust.accepted_handoff(handoff, "hold")
    if accepted is None:
        return
    try:
        cluster_cap.hold(accepted.run)
    except cluster_cap.HoldOn as wait:
        # Back exactly at the planned time (or for a look at the plan before it):
        # users are logged off at the time they were told, not up to a backoff later.
        raise self.retry(countdown=wait.seconds) from None


@shared_task(name="control.update_phase")
def update_phase(run_id: int) -> bool:
    """A scheduled run's update phase begins at its time (see chains.wake_at_phase)."""
    return chains.start_update_phase(run_id, arm=True)


@shared_task(name="control.wake_rollout")
def wake_rollout(rollout_id: int) -> int:
    """A resumed rollout's waiting nodes go on (rollouts.WakeRollout queues it at the resume's commit)."""
    return rollouts.wake(rollout_id)


@shared_task(name=COMPLETE)
def complete(handoff: dict[str, Any]) -> bool:
    # handoff: what node.resume returned, signed by the node.
    accepted = trust.accepted_handoff(handoff, "complete")
    return accepted is not None and end.complete_run(accepted.run, accepted.snapshot, accepted.seq)


@shared_task(name="control.reconcile")
def reconcile() -> int:
    return recovery.reconcile()


@worker_ready.connect
def _reconcile_at_start(sender: Any = None, **_: Any) -> None:
    # A control worker that starts (again) looks for runs its predecessor dropped.
    # (Node agents run their own Celery app, which never loads this module.)
    reconcile.apply_async(queue=CONTROL_QUEUE, countdown=settings.TGP_RECONCILE_AFTER)


@shared_task(name="control.reap_stale_runs")
def reap_stale_runs() -> int:
    return recovery.reap_stale_runs()


@shared_task(name="control.start_announced_updates")
def start_announced_updates() -> list[str]:
    """(beat, every TGP_ANNOUNCED_UPDATE_INTERVAL s) start the announced updates whose time has come."""
    from updates.announced import start_due

    return start_due()


@shared_task(name="control.resign_repository")
def resign_repository() -> list[str]:
    """(beat, every TGP_REPO_RESIGN_INTERVAL s) sign the repository's snapshot and timestamp
    again before they expire, where this host keeps the repository and its online keys."""
    from updates.repository import resign_configured

    return resign_configured()


@shared_task(name="control.scheduled_download")
def scheduled_download(schedule_id: int, at: str | None = None) -> str:
    from updates.scheduled import fire

    return fire(schedule_id, "download", datetime.fromisoformat(at) if at else None)


@shared_task(name="control.scheduled_update")
def scheduled_update(schedule_id: int, at: str | None = None) -> str:
    from updates.scheduled import fire

    return fire(schedule_id, "update", datetime.fromisoformat(at) if at else None)


@shared_task(name="control.rearm_schedules")
def rearm_schedules() -> int:
    from django.utils import timezone

    from updates.schedules import rearm_overdue

    return rearm_overdue(timezone.now())
