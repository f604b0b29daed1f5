"""Control-queue tasks: thin wrappers that take ids (or a typed message from a
node, decoded and checked by agent.shared.protocol) and call the plain functions
of updates.runs."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery import shared_task
from celery.signals import worker_ready
from django.conf import settings

from agent.shared.protocol import (
    COMPLETE,
    CONTROL_QUEUE,
    NODE_REPORT,
    RECORD_STEP,
    VERIFY,
    NodeReport,
    ProtocolError,
    Snapshot,
    StepReport,
)
from updates.runs import cluster_cap, end, recovery, reports
from updates.runs import verify as verification

log = logging.getLogger(__name__)


def _decoded(kind: type[Any], message: Any) -> Any:
    """The message, checked field by field; None (and a log line) for one that does not
    follow the protocol: it changes nothing, and retrying it would not help."""
    try:
        return kind.from_wire(message)
    except ProtocolError as exc:
        log.warning("refused a %s: %s", kind.__name__, exc)
        return None


def _chain_snapshot(snapshot: Any) -> dict[str, Any] | None:
    """The snapshot a node step returned, handed on by the chain (None when a chain starts here)."""
    decoded = None if snapshot is None else _decoded(Snapshot, snapshot)
    return decoded.to_wire() if decoded else None


@shared_task(name=RECORD_STEP, ignore_result=True)
def record_step(message: dict[str, Any]) -> None:
    report: StepReport | None = _decoded(StepReport, message)
    if report is None:
        return
    reports.record_step(
        report.run, report.step, report.event, detail=report.detail, bytes_done=report.bytes_done,
        bytes_total=report.bytes_total, snapshot=report.snapshot.to_wire() if report.snapshot else None,
        hostname=report.hostname, at=report.at, started=report.started,
    )  # fmt: skip


@shared_task(name=NODE_REPORT, ignore_result=True)
def node_report(message: dict[str, Any]) -> None:
    report: NodeReport | None = _decoded(NodeReport, message)
    if report is not None:
        recovery.node_reported(report.hostname, report.snapshot.to_wire())


@shared_task(
    name=VERIFY,
    autoretry_for=(verification.NodeNotBack,),
    throws=(verification.CarriedOn,),  # expected: logged without a traceback
    retry_backoff=1,
    retry_backoff_max=3,
    retry_jitter=False,
    max_retries=None,  # bounded by TGP_REBOOT_TIMEOUT inside verify_node_back
)
def verify(snapshot: dict[str, Any] | None, run_id: int) -> None:
    # snapshot: what node.reboot (or node.install) returned.
    verification.verify_node_back(run_id, _chain_snapshot(snapshot))


@shared_task(name="control.slot")  # sent at SLOT_PRIORITY (agent.shared.protocol)
def slot(run_id: int) -> None:
    # No retry while the cluster is full: the node waits in line in the database, and
    # a released slot goes to the longest waiter at once (cluster_cap.wake_waiters). A
    # retry per waiter would be control-queue traffic that grows with the cluster.
    with contextlib.suppress(cluster_cap.SlotWait):
        cluster_cap.take_slot(run_id)


@shared_task(
    name="control.hold",
    autoretry_for=(cluster_cap.HoldOn,),
    retry_backoff=1,
    retry_backoff_max=30,
    retry_jitter=False,
    max_retries=None,  # bounded by the cluster's load-balancer lead time
)
def hold(run_id: int) -> None:
    cluster_cap.hold(run_id)


@shared_task(name=COMPLETE)
def complete(snapshot: dict[str, Any] | None, run_id: int) -> bool:
    # snapshot: what node.resume returned.
    return end.complete_run(run_id, _chain_snapshot(snapshot))


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


@shared_task(name="control.scheduled_download")
def scheduled_download(schedule_id: int) -> str:
    from updates.scheduled import fire

    return fire(schedule_id, "download")


@shared_task(name="control.scheduled_update")
def scheduled_update(schedule_id: int) -> str:
    from updates.scheduled import fire

    return fire(schedule_id, "update")
