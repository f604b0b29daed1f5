"""Node-queue tasks, run by the node agent (``manage.py node_agent NAME``).

They never touch the database. Each reports through control-queue tasks, and
raises after reporting a failure so that the rest of the chain does not run.
Node steps are acknowledged on receipt: a step that dies with its agent is
resumed by the control plane when the agent reports again (see
workflow.node_reported), never by a broker redelivery after a reboot.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import Task, shared_task
from celery.signals import task_postrun, worker_ready
from django.conf import settings

from nodes import steps
from nodes.drivers import get_driver
from nodes.drivers.base import Driver
from nodes.drivers.simulated import REBOOT_EXIT_CODE
from updates.repository import DownloadError

log = logging.getLogger(__name__)
CONTROL_QUEUE = "control"
REPORT_PRIORITY = 9  # Redis: 0 (the default) is fetched first, 9 last
READY_PRIORITY = 0  # a worker's ready report: see _report_ready
ANNOUNCE_AFTER = 0.2  # seconds a step runs before its start is reported on its own
_reboot_requested = False


def agent_snapshot(driver: Driver) -> dict[str, Any]:
    taken = time.time()  # before reading: the stamp is never newer than the state it goes with
    snap = driver.snapshot()
    snap["taken_at"] = taken
    snap["agent_instance"] = os.environ.get("TGP_AGENT_INSTANCE", "")
    # Taken by the agent's worker (the supervisor runs without TGP_AGENT_NODE): it consumes.
    snap["worker"] = bool(os.environ.get("TGP_AGENT_NODE"))
    return snap


def send_to_control(name: str, *args: Any, priority: int = REPORT_PRIORITY, **kwargs: Any) -> None:
    """Reports go out at a lower priority than the chains' own control steps: when a
    whole cluster starts at once, its reports must not hold up the nodes that are
    out of service and waiting for verify or complete. Nothing depends on a report
    being processed before the chain's next step (verify takes its snapshot from the
    chain)."""
    from tgpadmin.celery import app

    # A short kwargsrepr: Celery would otherwise render the whole snapshot for each message.
    shown = {k: ("..." if k == "snapshot" else v) for k, v in kwargs.items()}
    app.send_task(
        name, args=args, kwargs=kwargs, queue=CONTROL_QUEUE, ignore_result=True, kwargsrepr=repr(shown),
        priority=priority, retry=True, retry_policy=settings.CELERY_TASK_PUBLISH_RETRY_POLICY,
    )  # fmt: skip


class Reporter:
    """A step's reports to the control plane.

    Its start is announced only once the step has run for ANNOUNCE_AFTER seconds:
    most steps take milliseconds, and then their outcome, which says when they
    started, is the only report (half the control plane's work). A slow step
    (a download, an install) shows as running within that time."""

    def __init__(
        self, driver: Driver, run_id: int, step: str, *, announce: bool = True, outbox: list[Any] | None = None
    ) -> None:
        self.driver, self.run_id, self.step = driver, run_id, step
        self.outbox = outbox  # where the outcome waits until the task has returned (NodeStep)
        self.snapshot: dict[str, Any] | None = None
        self.started = time.time()
        # Announced already on a retry (the attempt before it failed after announcing).
        self._quiet = announce
        self._lock = threading.Lock()  # the timer's announcement and the outcome never cross
        self._timer = threading.Timer(ANNOUNCE_AFTER, self.announce)
        self._timer.daemon = True
        if announce:
            self._timer.start()

    def announce(self) -> None:
        """Report the start now, if it is not reported yet (the step runs on)."""
        with self._lock:
            if self._quiet:
                self._quiet = False
                send_to_control("control.record_step", self.run_id, self.step, "started", at=self.started)

    def __call__(self, event: str, **fields: Any) -> None:
        if event == "progress":  # a step that reports progress is running: its start goes first
            self.announce()
            send_to_control("control.record_step", self.run_id, self.step, event, **fields)
            return
        self._timer.cancel()
        with self._lock:
            if self._quiet:
                fields["started"] = self.started
                self._quiet = False
            fields["at"] = time.time()  # the step's times are the node's (see workflow.record_step)
            # Only the outcome carries a snapshot: a start or progress changes nothing
            # the control plane keeps about the node.
            fields["snapshot"] = self.snapshot = agent_snapshot(self.driver)
            fields["hostname"] = self.driver.hostname
            if self.outbox is None:
                send_to_control("control.record_step", self.run_id, self.step, event, **fields)
            else:
                self.outbox.append((self.run_id, self.step, event, fields))


def driver_for(payload: dict[str, Any]) -> Driver:
    served = os.environ.get("TGP_AGENT_NODE")
    if served and payload["node"] != served:
        raise RuntimeError(f"message for {payload['node']} reached the agent of {served}")
    return get_driver(payload["node"])


class NodeStep(Task):
    """A node step. Its outcome report goes out once the task has returned, after the
    chain's next message: the next step (often the control plane's verify or
    complete, which take the node's snapshot from the chain) need not wait for the
    report to be published first. Reports the final failure of a step (after any
    retries) too."""

    step = ""

    def outbox(self) -> list[Any]:
        """The outcome reports of the running task (its request), sent by after_return."""
        box: list[Any] = self.request.__dict__.setdefault("tgp_outbox", [])
        return box

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # type: ignore[no-untyped-def,override]
        payload = args[0]
        try:
            report = Reporter(driver_for(payload), payload["run"], self.step, announce=False, outbox=self.outbox())
            report("failed", detail=f"{type(exc).__name__}: {exc}")
        except Exception:  # the report must not hide the original failure
            log.exception("could not report the failure of %s", self.name)

    def after_return(self, status, retval, task_id, args, kwargs, einfo) -> None:  # type: ignore[no-untyped-def,override]
        # Celery calls this after it has published the chain's next message, and before
        # task_postrun (where a simulated reboot exits the worker).
        box = self.outbox()
        for run_id, step, event, fields in box:
            send_to_control("control.record_step", run_id, step, event, **fields)
        box.clear()


def _run_step(task: Task, payload: dict[str, Any], fn: Any) -> dict[str, Any] | None:
    """Run one step; returns the node's snapshot after it, which a chain hands to
    the next task (control.verify takes it from there)."""
    driver = driver_for(payload)
    retried = bool(task.request.retries)
    report = Reporter(driver, payload["run"], task.step, announce=not retried, outbox=task.outbox())  # type: ignore[attr-defined]
    try:
        fn(driver, payload, report)
    except Exception:
        report.announce()  # retried (or failed by on_failure): it ran, and shows so
        raise
    return report.snapshot


@shared_task(name="node.notify", step="notify", bind=True, base=NodeStep, acks_late=False)
def notify(self: Task, payload: dict[str, Any]) -> None:
    _run_step(self, payload, steps.notify)


@shared_task(name="node.exclude", step="exclude", bind=True, base=NodeStep, acks_late=False)
def exclude(self: Task, payload: dict[str, Any]) -> None:
    _run_step(self, payload, steps.exclude)


@shared_task(name="node.drain", step="drain", bind=True, base=NodeStep, acks_late=False)
def drain(self: Task, payload: dict[str, Any]) -> None:
    _run_step(self, payload, steps.drain)


@shared_task(
    name="node.download",
    step="download",
    autoretry_for=(DownloadError,),
    retry_backoff=settings.TGP_DOWNLOAD_BACKOFF,
    retry_backoff_max=settings.TGP_DOWNLOAD_BACKOFF_MAX,
    retry_jitter=False,
    max_retries=settings.TGP_DOWNLOAD_ATTEMPTS - 1,
    bind=True,
    base=NodeStep,
    acks_late=False,
)
def download(self: Task, payload: dict[str, Any]) -> None:
    _run_step(self, payload, steps.download)


@shared_task(name="node.install", step="install", bind=True, base=NodeStep, acks_late=False)
def install(self: Task, payload: dict[str, Any]) -> dict[str, Any] | None:
    # Its snapshot goes on to verify, which follows it when the release needs no reboot.
    return _run_step(self, payload, steps.install)


@shared_task(name="node.reboot", step="reboot", bind=True, base=NodeStep, acks_late=False)
def reboot(self: Task, payload: dict[str, Any]) -> dict[str, Any] | None:
    return _run_step(self, payload, _reboot)


def _reboot(driver: Driver, payload: dict[str, Any], report: Reporter) -> None:
    global _reboot_requested
    steps.check_fence(payload)
    if not steps.needs_reboot(driver, payload):
        report("skipped", detail="this release needs no reboot")
        return
    if not driver.reboot(payload["run"]):
        report("succeeded", detail="rebooted already for this run")
        return
    report("succeeded", detail="reboot issued")
    # The simulated appliance goes down once this task has returned and the chain's
    # next message is published (see _reboot_after_task); a real host reboots itself.
    _reboot_requested = driver.simulates_reboot


@task_postrun.connect(sender=reboot)
def _reboot_after_task(**_: Any) -> None:
    if _reboot_requested:
        log.warning("simulated reboot: agent worker exits with %s", REBOOT_EXIT_CODE)
        logging.shutdown()
        os._exit(REBOOT_EXIT_CODE)


@shared_task(name="node.resume", step="resume", bind=True, base=NodeStep, acks_late=False)
def resume(self: Task, payload: dict[str, Any]) -> dict[str, Any] | None:
    return _run_step(self, payload, steps.resume)


@worker_ready.connect
def _report_ready(**_: Any) -> None:
    """An agent's worker says that it takes work now: after a reboot, the node is back
    once this report is in (workflow.verify_node_back), not when the supervisor first
    reports the new boot while the worker is still starting."""
    hostname = os.environ.get("TGP_AGENT_NODE")
    if hostname:
        # Ahead of the fleet's heartbeats, like the chains' own control steps: after a
        # reboot, this report is what a node out of service waits for (verify).
        snapshot = agent_snapshot(driver_for({"node": hostname}))
        send_to_control("control.node_report", hostname, snapshot, priority=READY_PRIORITY)


@shared_task(name="node.announce", acks_late=False)
def announce(hostname: str, notice_id: str, message: str) -> None:
    """Deliver a maintenance notice ahead of time (no run involved)."""
    driver = driver_for({"node": hostname})
    driver.deliver_notice(notice_id, message)
    send_to_control("control.node_report", hostname, agent_snapshot(driver))


@shared_task(name="node.end_maintenance", acks_late=False)
def end_maintenance(hostname: str) -> None:
    driver = driver_for({"node": hostname})
    driver.resume()
    send_to_control("control.node_report", hostname, agent_snapshot(driver))
