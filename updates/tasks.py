"""Control-queue tasks: thin wrappers that take ids and call the plain functions
of updates.runs."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from celery import shared_task
from celery.signals import worker_ready
from django.conf import settings

from updates.runs import cluster_cap, end, recovery, reports
from updates.runs import verify as verification


@shared_task(name="control.record_step", ignore_result=True)
def record_step(run_id: int, step: str, event: str, **fields: Any) -> None:
    reports.record_step(run_id, step, event, **fields)


@shared_task(name="control.node_report", ignore_result=True)
def node_report(hostname: str, snapshot: dict[str, Any]) -> None:
    recovery.node_reported(hostname, snapshot)


@shared_task(
    name="control.verify",
    autoretry_for=(verification.NodeNotBack,),
    throws=(verification.CarriedOn,),  # expected: logged without a traceback
    retry_backoff=1,
    retry_backoff_max=3,
    retry_jitter=False,
    max_retries=None,  # bounded by TGP_REBOOT_TIMEOUT inside verify_node_back
)
def verify(snapshot: dict[str, Any] | None, run_id: int) -> None:
    # snapshot: what node.reboot returned, handed on by the chain (None when a chain starts here).
    verification.verify_node_back(run_id, snapshot)


@shared_task(name="control.slot")  # sent at chains.SLOT_PRIORITY
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


@shared_task(name="control.complete")
def complete(snapshot: dict[str, Any] | None, run_id: int) -> bool:
    # snapshot: what node.resume returned, handed on by the chain (None when a chain starts here).
    return end.complete_run(run_id, snapshot)


@shared_task(name="control.reconcile")
def reconcile() -> int:
    return recovery.reconcile()


@worker_ready.connect
def _reconcile_at_start(sender: Any = None, **_: Any) -> None:
    # A control worker that starts (again) looks for runs its predecessor dropped.
    # Node agents are workers too, but never touch the database: they skip this.
    if not os.environ.get("TGP_AGENT_NODE"):
        reconcile.apply_async(queue="control", countdown=settings.TGP_RECONCILE_AFTER)


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
