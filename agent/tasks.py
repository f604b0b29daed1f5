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

from agent import identity, steps
from agent.app import app
from agent.config import config
from agent.drivers import get_driver
from agent.drivers.base import Driver
from agent.drivers.simulated import REBOOT_EXIT_CODE
from agent.shared import signing
from agent.shared.protocol import (
    CONTROL_QUEUE,
    ENROLL,
    HANDOFF_PRIORITY,
    HEARTBEATS,
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
    render_notice,
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


def send_to_control(name: str, envelope: dict[str, Any], *, priority: int = REPORT_PRIORITY) -> None:
    """Reports go out at a lower priority than the chains' own control steps: when a
    whole cluster starts at once, its reports must not hold up the nodes that are
    out of service and waiting for verify or complete. Nothing depends on a report
    being processed before the chain's next step (verify takes its snapshot from the
    chain)."""
    body = envelope["body"]
    app.send_task(
        name, args=(envelope,), queue=report_queue, ignore_result=True, priority=priority,
        # A short argsrepr: Celery would otherwise render the whole snapshot for each message.
        argsrepr=f"({body['kind']} {body['signer']} #{body['seq']})",
    )  # fmt: skip


def _for_me(node: str) -> None:
    served = config().served
    if served and node not in served:
        raise ProtocolError(f"a message for {node} reached the agent of {', '.join(served)}")


def _fresh(body: dict[str, Any], node: str) -> None:
    """Not expired (by this node's clock: commands live for hours, see TGP_COMMAND_TTL) and never carried out."""
    expires, command_id = body.get("expires"), body.get("id")
    if not isinstance(expires, int | float) or isinstance(expires, bool) or not isinstance(command_id, str):
        raise ProtocolError("a command without an id and an expiry")
    if expires <= time.time():
        raise ProtocolError(
            f"command {command_id} expired at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(expires))} UTC"
        )
    if identity.carried_out(node, command_id):
        raise ProtocolError(f"command {command_id} was carried out already: a replay")


def command_for(envelope: Any, step: str) -> tuple[StepCommand, dict[str, Any]]:
    """The step command in a message, if the control plane signed it for this step of a node
    this agent serves, and it is neither expired nor a replay; ProtocolError says why not."""
    body = identity.opened_command(envelope, "step")
    if body.get("step") != step:
        raise ProtocolError(f"a command for step {body.get('step')!r} reached node.{step}")
    command = StepCommand.from_wire(body.get("command"))
    _for_me(command.node)
    _fresh(body, command.node)
    return command, body


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
                send_report(self._report("started", at=self.started))

    def __call__(self, event: str, **fields: Any) -> None:
        if event == "progress":  # a step that reports progress is running: its start goes first
            self.announce()
            send_report(self._report(event, at=time.time(), **fields))
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
                send_report(report)
            else:
                self.outbox.append(report)


def send_report(report: StepReport, *, priority: int = REPORT_PRIORITY) -> None:
    send_to_control(RECORD_STEP, identity.signed(report.hostname, "report", report.to_wire()), priority=priority)


def _run_id(envelope: Any) -> int | None:
    """The run a refused message names, if it names one at all: its failure is reported as
    this agent's own (the control plane fails only a run of this node for it)."""
    try:
        run = envelope["body"]["command"]["run"]
    except (KeyError, TypeError):
        return None
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
        accepted = self.request.__dict__.get("tgp_command")
        # Refused: said as the node this agent serves, never as the node the message names.
        hostname = accepted.node if accepted else (config().served[0] if config().served else "")
        run_id = _run_id(payload)
        if run_id is None or not hostname:
            return
        try:
            report = Reporter(driver_for(hostname), run_id, self.step, announce=False, outbox=self.outbox())
            report("failed", detail=f"{type(exc).__name__}: {exc}")
        except Exception:  # the report must not hide the original failure
            log.exception("could not report the failure of %s", self.name)

    def goes_on(self) -> bool:
        """Whether a task of the chain follows this one (asked before the step runs: once it
        has returned, Celery has taken the next one off the request)."""
        return bool(self.request.chain or self.request.callbacks)

    def after_return(self, status, retval, task_id, args, kwargs, einfo) -> None:  # type: ignore[no-untyped-def,override]
        # Celery calls this after it has published the chain's next message, and before
        # task_postrun (where a simulated reboot exits the worker).
        box = self.outbox()
        handoff = status == "FAILURE" or not self.request.__dict__.get("tgp_goes_on", True)
        for report in box:
            send_report(report, priority=HANDOFF_PRIORITY if handoff else REPORT_PRIORITY)
        box.clear()
        done = self.request.__dict__.get("tgp_done")
        if done and status in ("SUCCESS", "FAILURE"):  # not between two attempts of a retry
            identity.remember(*done)


StepFn = Callable[[Driver, StepCommand, Reporter], None]
# What a step does before it starts (its start is reported from then on): a drain waits for its users' time.
BeforeFn = Callable[[StepCommand], object]


def _run_step(task: NodeStep, payload: Any, fn: StepFn, before: BeforeFn | None = None) -> dict[str, Any] | None:
    """Run one step; returns the node's snapshot after it, which a chain hands to
    the next task (control.verify and control.complete take it from there)."""
    try:
        command, body = command_for(payload, task.step)
    except ProtocolError as exc:
        log.error("refused %s: %s", task.name, exc)
        raise
    task.request.__dict__["tgp_command"] = command
    task.request.__dict__["tgp_goes_on"] = task.goes_on()
    task.request.__dict__["tgp_done"] = (command.node, body["id"], body["expires"])
    driver = driver_for(command.node)
    if before is not None:
        before(command)
    retried = bool(task.request.retries)
    report = Reporter(driver, command.run, task.step, announce=not retried, outbox=task.outbox())
    try:
        fn(driver, command, report)
    except Exception:
        report.announce()  # retried (or failed by on_failure): it ran, and shows so
        raise
    # The hand-off to the chain's next task (verify, complete, slot, hold take it): signed,
    # so that only this node can say that this step of its run is done.
    handoff = {
        "run": command.run,
        "step": task.step,
        "snapshot": report.snapshot.to_wire() if report.snapshot else None,
    }
    return identity.signed(command.node, "done", handoff)


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


def _step_task(step: str, fn: StepFn, *, before: BeforeFn | None = None, **options: Any) -> Any:
    @app.task(name=f"node.{step}", step=step, bind=True, base=NodeStep, **options)
    def run_step(self: NodeStep, payload: Any) -> dict[str, Any] | None:
        return _run_step(self, payload, fn, before)

    return run_step


notify = _step_task("notify", steps.notify)
exclude = _step_task("exclude", steps.exclude)
drain = _step_task("drain", steps.drain, before=steps.until_logoff)  # the fencing check comes after the wait
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
    send_to_control(
        NODE_REPORT,
        identity.signed(hostname, "node_report", NodeReport(hostname, snapshot).to_wire()),
        priority=priority,
    )


def send_heartbeat(hostname: str, snapshot: Snapshot) -> None:
    """The supervisor's heartbeat: the same signed node report, pushed onto the heartbeats
    list (one RPUSH) instead of sent as a control task; `manage.py heartbeats` takes them in
    batches. What needs to be quick (the worker's ready report after a reboot) stays a
    task at its own priority: report_node."""
    envelope = identity.signed(hostname, "node_report", NodeReport(hostname, snapshot).to_wire())
    steps.broker().rpush(HEARTBEATS, signing.encode(envelope))


def request_enrollment(hostname: str, public_key: str) -> None:
    """Offer the node's key to the control plane, signed with it (it has the private key):
    an operator accepts it on the node's page, and until then nothing of the node is trusted."""
    send_to_control(ENROLL, identity.signed(hostname, "enroll", {"hostname": hostname, "public_key": public_key}))


@worker_ready.connect
def _report_ready(**_: Any) -> None:
    """An agent's worker says that it takes work now: after a reboot, the node is back
    once this report is in (the control plane's verify), not when the supervisor first
    reports the new boot while the worker is still starting."""
    served = config().served
    if len(served) == 1:  # a benchmark worker playing many nodes has no reboots to wait for
        # Ahead of the fleet's heartbeats, like the chains' own control steps.
        report_node(served[0], snapshot_of(driver_for(served[0])), priority=READY_PRIORITY)


def _notice(envelope: Any, kind: str) -> tuple[NoticeCommand, Driver]:
    try:
        body = identity.opened_command(envelope, kind)
        notice = NoticeCommand.from_wire(body.get("command"))
        _for_me(notice.node)
        _fresh(body, notice.node)
    except ProtocolError as exc:
        log.error("refused node.%s: %s", kind, exc)
        raise
    identity.remember(notice.node, body["id"], body["expires"])  # a notice is delivered once, even if this fails
    return notice, driver_for(notice.node)


@app.task(name="node.announce", acks_late=False)
def announce(envelope: Any) -> None:
    """Deliver a maintenance notice ahead of time (no run involved), or take one back
    (`withdraws`). The appliance remembers the notice: users who log on before its
    time get it too."""
    notice, driver = _notice(envelope, "notice")
    text = render_notice(notice.message, notice.at, config().time_zone, missing="Maintenance begins {when}.")
    if notice.withdraws:
        driver.withdraw_notice(notice.withdraws, notice.notice_id, text)
    else:
        driver.deliver_notice(notice.notice_id, text, notice.at)
    report_node(notice.node, snapshot_of(driver))


@app.task(name="node.end_maintenance", acks_late=False)
def end_maintenance(envelope: Any) -> None:
    notice, driver = _notice(envelope, "end_maintenance")
    driver.resume()
    report_node(notice.node, snapshot_of(driver))
