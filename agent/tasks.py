"""Node-queue tasks, run by the agent's worker (``python -m agent NODE``).

They never touch a database. Every message is checked before anything touches the
appliance (agent.shared.protocol: a run id is an integer, a version follows the
version rule, the node is the one this agent serves); one that is not is refused
with a log line that says why, and its step fails. Each step reports through
control-queue tasks, and raises after reporting a failure so that the rest of the
chain does not run. Node steps are acknowledged on receipt: a step that dies with
its agent is resumed by the control plane when the agent reports again, never by a
broker redelivery after a reboot.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.signals import task_postrun, worker_ready

from agent import steps
from agent.app import app
from agent.config import config
from agent.drivers import get_driver
from agent.drivers.base import Driver
from agent.drivers.simulated import REBOOT_EXIT_CODE
from agent.shared.protocol import (
    CONTROL_QUEUE,
    NODE_REPORT,
    READY_PRIORITY,
    RECORD_STEP,
    REPORT_PRIORITY,
    NodeReport,
    NoticeCommand,
    ProtocolError,
    Snapshot,
    StepCommand,
    StepReport,
)
from agent.shared.repository import DownloadError

log = logging.getLogger(__name__)
ANNOUNCE_AFTER = 0.2  # seconds a step runs before its start is reported on its own
_SNAPSHOT_FIELDS = set(Snapshot.__dataclass_fields__) - {"taken_at", "agent_instance", "worker"}
_reboot_requested = False
# Where reports go; a test may point it at a queue of its own.
report_queue = CONTROL_QUEUE


def driver_for(hostname: str) -> Driver:
    cfg = config()
    return get_driver(hostname, cfg.driver, cfg.node_dir(hostname))


def snapshot_of(driver: Driver, *, instance: str | None = None) -> Snapshot:
    """The appliance's state as the protocol carries it, checked like any message.
    Taken by the agent's worker (which consumes), unless the supervisor names the
    instance of the worker it runs (a heartbeat)."""
    taken = time.time()  # before reading: the stamp is never newer than the state it goes with
    state = {k: v for k, v in driver.snapshot().items() if k in _SNAPSHOT_FIELDS}
    stamp = {"taken_at": taken, "agent_instance": instance or config().instance, "worker": instance is None}
    return Snapshot.from_wire({**Snapshot().to_wire(), **state, **stamp})


def send_to_control(name: str, message: dict[str, Any], *, priority: int = REPORT_PRIORITY) -> None:
    """Reports go out at a lower priority than the chains' own control steps: when a
    whole cluster starts at once, its reports must not hold up the nodes that are
    out of service and waiting for verify or complete. Nothing depends on a report
    being processed before the chain's next step (verify takes its snapshot from the
    chain)."""
    app.send_task(
        name, args=(message,), queue=report_queue, ignore_result=True, priority=priority,
        # A short argsrepr: Celery would otherwise render the whole snapshot for each message.
        argsrepr=f"({message.get('run', message.get('hostname'))!r}, ...)",
    )  # fmt: skip


def command_for(payload: Any) -> StepCommand:
    """The step command in a message, checked field by field, for a node this agent serves."""
    command = StepCommand.from_wire(payload)
    served = config().served
    if served and command.node not in served:
        raise ProtocolError(f"a message for {command.node} reached the agent of {', '.join(served)}")
    return command


class Reporter:
    """A step's reports to the control plane.

    Its start is announced only once the step has run for ANNOUNCE_AFTER seconds:
    most steps take milliseconds, and then their outcome, which says when they
    started, is the only report (half the control plane's work). A slow step
    (a download, an install) shows as running within that time."""

    def __init__(
        self, driver: Driver, run_id: int, step: str, *, announce: bool = True, outbox: list[StepReport] | None = None
    ) -> None:
        self.driver, self.run_id, self.step = driver, run_id, step
        self.outbox = outbox  # where the outcome waits until the task has returned (NodeStep)
        self.snapshot: Snapshot | None = None
        self.started = time.time()
        # Announced already on a retry (the attempt before it failed after announcing).
        self._quiet = announce
        self._lock = threading.Lock()  # the timer's announcement and the outcome never cross
        self._timer = threading.Timer(ANNOUNCE_AFTER, self.announce)
        self._timer.daemon = True
        if announce:
            self._timer.start()

    def _report(self, event: str, **fields: Any) -> StepReport:
        return StepReport(run=self.run_id, step=self.step, event=event, hostname=self.driver.hostname, **fields)

    def announce(self) -> None:
        """Report the start now, if it is not reported yet (the step runs on)."""
        with self._lock:
            if self._quiet:
                self._quiet = False
                send_to_control(RECORD_STEP, self._report("started", at=self.started).to_wire())

    def __call__(self, event: str, **fields: Any) -> None:
        if event == "progress":  # a step that reports progress is running: its start goes first
            self.announce()
            send_to_control(RECORD_STEP, self._report(event, at=time.time(), **fields).to_wire())
            return
        self._timer.cancel()
        with self._lock:
            if self._quiet:
                fields["started"] = self.started
                self._quiet = False
            # Only the outcome carries a snapshot: a start or progress changes nothing
            # the control plane keeps about the node.
            self.snapshot = snapshot_of(self.driver)
            report = self._report(event, at=time.time(), snapshot=self.snapshot, **fields)
            if self.outbox is None:
                send_to_control(RECORD_STEP, report.to_wire())
            else:
                self.outbox.append(report)


def _run_id(payload: Any) -> int | None:
    """The run a refused message names, if it names one at all."""
    run = payload.get("run") if isinstance(payload, dict) else None
    return run if isinstance(run, int) and not isinstance(run, bool) and run > 0 else None


class NodeStep(Task):
    """A node step. Its outcome report goes out once the task has returned, after the
    chain's next message: the next step (often the control plane's verify or
    complete, which take the node's snapshot from the chain) need not wait for the
    report to be published first. Reports the final failure of a step (after any
    retries) too, and the refusal of a message that does not follow the protocol."""

    step = ""
    acks_late = False

    def outbox(self) -> list[StepReport]:
        """The outcome reports of the running task (its request), sent by after_return."""
        box: list[StepReport] = self.request.__dict__.setdefault("tgp_outbox", [])
        return box

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:  # type: ignore[no-untyped-def,override]
        payload = args[0] if args else None
        try:
            hostname = command_for(payload).node
        except ProtocolError:
            # Refused: said as the node this agent serves, never as the node the message names.
            hostname = config().served[0] if config().served else ""
        run_id = _run_id(payload)
        if run_id is None or not hostname:
            return
        try:
            report = Reporter(driver_for(hostname), run_id, self.step, announce=False, outbox=self.outbox())
            report("failed", detail=f"{type(exc).__name__}: {exc}")
        except Exception:  # the report must not hide the original failure
            log.exception("could not report the failure of %s", self.name)

    def after_return(self, status, retval, task_id, args, kwargs, einfo) -> None:  # type: ignore[no-untyped-def,override]
        # Celery calls this after it has published the chain's next message, and before
        # task_postrun (where a simulated reboot exits the worker).
        box = self.outbox()
        for report in box:
            send_to_control(RECORD_STEP, report.to_wire())
        box.clear()


StepFn = Callable[[Driver, StepCommand, Reporter], None]


def _run_step(task: NodeStep, payload: Any, fn: StepFn) -> dict[str, Any] | None:
    """Run one step; returns the node's snapshot after it, which a chain hands to
    the next task (control.verify and control.complete take it from there)."""
    try:
        command = command_for(payload)
    except ProtocolError as exc:
        log.error("refused %s: %s", task.name, exc)
        raise
    driver = driver_for(command.node)
    retried = bool(task.request.retries)
    report = Reporter(driver, command.run, task.step, announce=not retried, outbox=task.outbox())
    try:
        fn(driver, command, report)
    except Exception:
        report.announce()  # retried (or failed by on_failure): it ran, and shows so
        raise
    return report.snapshot.to_wire() if report.snapshot else None


def _reboot(driver: Driver, command: StepCommand, report: Reporter) -> None:
    global _reboot_requested
    steps.check_fence(command)
    if not steps.needs_reboot(driver, command):
        report("skipped", detail="this release needs no reboot")
        return
    if not driver.reboot(command.run):
        report("succeeded", detail="rebooted already for this run")
        return
    report("succeeded", detail="reboot issued")
    # The simulated appliance goes down once this task has returned and the chain's
    # next message is published (see _reboot_after_task); a real host reboots itself.
    _reboot_requested = driver.simulates_reboot


def _step_task(step: str, fn: StepFn, **options: Any) -> Any:
    @app.task(name=f"node.{step}", step=step, bind=True, base=NodeStep, **options)
    def run_step(self: NodeStep, payload: Any) -> dict[str, Any] | None:
        return _run_step(self, payload, fn)

    return run_step


notify = _step_task("notify", steps.notify)
exclude = _step_task("exclude", steps.exclude)
drain = _step_task("drain", steps.drain)
download = _step_task(
    "download",
    steps.download,
    autoretry_for=(DownloadError,),
    retry_backoff=config().download_backoff,
    retry_backoff_max=config().download_backoff_max,
    retry_jitter=False,
    max_retries=config().download_attempts - 1,
)
install = _step_task("install", steps.install)  # its snapshot goes on to verify when no reboot follows
reboot = _step_task("reboot", _reboot)
resume = _step_task("resume", steps.resume)


@task_postrun.connect(sender=reboot)
def _reboot_after_task(**_: Any) -> None:
    if _reboot_requested:
        log.warning("simulated reboot: agent worker exits with %s", REBOOT_EXIT_CODE)
        logging.shutdown()
        os._exit(REBOOT_EXIT_CODE)


def report_node(hostname: str, snapshot: Snapshot, *, priority: int = REPORT_PRIORITY) -> None:
    send_to_control(NODE_REPORT, NodeReport(hostname, snapshot).to_wire(), priority=priority)


@worker_ready.connect
def _report_ready(**_: Any) -> None:
    """An agent's worker says that it takes work now: after a reboot, the node is back
    once this report is in (the control plane's verify), not when the supervisor first
    reports the new boot while the worker is still starting."""
    served = config().served
    if len(served) == 1:  # a benchmark worker playing many nodes has no reboots to wait for
        # Ahead of the fleet's heartbeats, like the chains' own control steps.
        report_node(served[0], snapshot_of(driver_for(served[0])), priority=READY_PRIORITY)


def _notice(payload: Any) -> tuple[NoticeCommand, Driver]:
    notice = NoticeCommand.from_wire(payload)
    served = config().served
    if served and notice.node not in served:
        raise ProtocolError(f"a notice for {notice.node} reached the agent of {', '.join(served)}")
    return notice, driver_for(notice.node)


@app.task(name="node.announce", acks_late=False)
def announce(payload: Any) -> None:
    """Deliver a maintenance notice ahead of time (no run involved)."""
    notice, driver = _notice(payload)
    driver.deliver_notice(notice.notice_id, notice.message)
    report_node(notice.node, snapshot_of(driver))


@app.task(name="node.end_maintenance", acks_late=False)
def end_maintenance(payload: Any) -> None:
    notice, driver = _notice(payload)
    driver.resume()
    report_node(notice.node, snapshot_of(driver))
