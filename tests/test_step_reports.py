"""What a node tells the control plane about a step: a quick step is one report
(its outcome, which says when it began), a slow one shows as running while it runs.

The reports go through real Redis, into a queue of the test's own (no control
worker takes them), and are then recorded as the control worker would."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from agent import identity
from agent import tasks as node_tasks
from agent.app import app as agent_app
from agent.drivers.simulated import SimulatedDriver
from agent.shared.protocol import HANDOFF_PRIORITY, REPORT_PRIORITY, Snapshot
from nodes.models import Node
from tgpadmin.celery import app
from updates import tasks as control_tasks
from updates import trust
from updates.models import UpdateRun, UpdateStep
from updates.runs import chains, start

pytestmark = pytest.mark.django_db


class Received(dict):
    """A report's fields as the node sent them; `envelope`: the signed message itself."""

    envelope: dict[str, Any]


@pytest.fixture
def inbox(monkeypatch):
    """The reports the agent code sends, as (event, report), read back from Redis."""
    queue = f"reports-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(node_tasks, "report_queue", queue)
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue)

        def take(timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
            message = simple.get(timeout=timeout)
            message.ack()
            (envelope,), _, _ = message.decode()
            assert message.headers["task"] == "control.record_step"
            report = Received(envelope["body"]["message"])
            report.envelope = envelope
            return report["event"], report

        yield SimpleNamespace(take=take, Empty=simple.Empty)
        simple.close()


@pytest.fixture
def run(make_node, releases, state_dir, agent_settings, django_capture_on_commit_callbacks):
    node = make_node("gw")
    with django_capture_on_commit_callbacks(execute=False):  # no chain: the test plays the node
        made = start.start_update(Node.objects.get(pk=node.pk), releases["2.2.0"])
    made.driver = SimulatedDriver(node.hostname, state_dir / node.hostname)
    return made


def record(run: UpdateRun, step: str, event: str, report: Received) -> UpdateStep:
    """Recorded as the control worker does: the signature checked, the message decoded, then recorded."""
    assert (report["run"], report["step"], report["event"]) == (run.pk, step, event)
    control_tasks.record_step(report.envelope)
    return UpdateStep.objects.get(run=run, name=step)


def test_a_quick_step_is_one_report_that_says_when_it_began_and_ended(run, inbox):
    report = node_tasks.Reporter(run.driver, run.pk, "notify")
    report("succeeded", detail="maintenance mode on")

    event, kwargs = inbox.take()
    assert event == "succeeded" and kwargs["started"] <= kwargs["at"]
    with pytest.raises(inbox.Empty):  # a start report on its way would be here by then
        inbox.take(timeout=node_tasks.ANNOUNCE_AFTER * 3)

    step = record(run, "notify", event, kwargs)
    assert (step.state, step.attempts) == ("succeeded", 1)
    assert step.started_at == datetime.fromtimestamp(kwargs["started"], tz=UTC)
    assert step.finished_at >= step.started_at
    assert UpdateRun.objects.with_current_step().get(pk=run.pk).current_step == "download", "the run is past notify"


def test_a_slow_step_shows_as_running_before_it_ends(run, inbox):
    report = node_tasks.Reporter(run.driver, run.pk, "install")
    event, kwargs = inbox.take()  # the step runs on: its start is announced without waiting for its end
    assert event == "started"
    step = record(run, "install", event, kwargs)
    assert (step.state, step.attempts) == ("running", 1)
    assert step.started_at == datetime.fromtimestamp(report.started, tz=UTC)

    report("succeeded", detail="installed")
    event, kwargs = inbox.take()
    assert event == "succeeded" and kwargs["started"] is None
    step = record(run, "install", event, kwargs)
    assert (step.state, step.attempts) == ("succeeded", 1), "one attempt, counted once"


def test_a_step_that_fails_at_once_shows_that_it_ran(run, inbox):
    task = SimpleNamespace(step="download", request=SimpleNamespace(retries=0), outbox=list, goes_on=lambda: True)

    def unreachable(*_: Any) -> None:
        raise ConnectionError("repository unreachable")

    with pytest.raises(ConnectionError):
        node_tasks._run_step(task, trust.command("step", chains.node_payload(run), step="download"), unreachable)
    event, kwargs = inbox.take()
    # While its retry waits (or until on_failure's report lands), the admin shows the step as running.
    assert event == "started"
    assert record(run, "download", event, kwargs).state == "running"


def test_a_workers_ready_report_goes_ahead_of_the_fleets_heartbeats(make_node, agent_settings, monkeypatch):
    # After a reboot, verify waits for this report while the node is out of service: it
    # must not queue behind a backlog of other nodes' heartbeats.
    node = make_node("gw")
    agent_settings(served=(node.hostname,))
    queue = f"control-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(node_tasks, "report_queue", queue)
    for i in range(20):
        identity.enroll(f"other{i}")
        node_tasks.report_node(f"other{i}", Snapshot())
    node_tasks._report_ready()

    with app.connection_for_read() as conn, conn.SimpleQueue(queue) as backlog:
        message = backlog.get(timeout=5)
        message.ack()
        (envelope,), _, _ = message.decode()
        report = envelope["body"]["message"]
        assert report["hostname"] == node.hostname and report["snapshot"]["worker"] is True
        while True:  # leave nothing behind in Redis
            try:
                backlog.get(timeout=0.2).ack()
            except backlog.Empty:
                break


def test_the_chains_next_step_is_queued_before_the_steps_own_report(run, agent_settings, monkeypatch):
    # The next step (often verify or complete, which take the node's snapshot from the
    # chain) must not wait for the report to be published. Both go to one private
    # queue at one priority here, so Redis keeps them in the order they were sent.
    from celery import signature
    from celery.app.trace import build_tracer

    queue = f"order-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(node_tasks, "report_queue", queue)
    payload = trust.command("step", chains.node_payload(run), step="notify")
    after = signature("control.complete", queue=queue, priority=9)
    trace = build_tracer("node.notify", node_tasks.notify, app=agent_app, eager=False)
    trace(uuid.uuid4().hex, (payload,), {}, {"chain": [dict(after)], "delivery_info": {"priority": 9}})

    with app.connection_for_read() as conn, conn.SimpleQueue(queue) as sent:
        order = []
        for _ in range(2):
            message = sent.get(timeout=5)
            message.ack()
            order.append(message.headers["task"])
    assert order == ["control.complete", "control.record_step"]


def test_the_outcome_of_a_step_that_ends_its_chain_goes_at_the_chains_priority_the_others_behind_every_report(
    run, agent_settings, monkeypatch
):
    # A scheduled run's download ends its chain: at the update time its outcome carries the
    # run on, and a failure frees the node's slot. Behind a fleet's reports (priority 9)
    # the update phase started some 30 s late (bench/beat_lag.py, 500 single systems).
    from celery import signature
    from celery.app.trace import build_tracer

    queue = f"prio-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(node_tasks, "report_queue", queue)
    trace = build_tracer("node.notify", node_tasks.notify, app=agent_app, eager=False)
    going_on = {"chain": [dict(signature("control.complete", queue=queue))], "delivery_info": {"priority": 9}}
    for request in (going_on, {"delivery_info": {"priority": 9}}):  # the second ends its chain
        trace(uuid.uuid4().hex, (trust.command("step", chains.node_payload(run), step="notify"),), {}, request)

    with app.connection_for_read() as conn, conn.SimpleQueue(queue) as sent:
        reports = []
        for _ in range(3):
            message = sent.get(timeout=5)
            message.ack()
            if message.headers["task"] == "control.record_step":
                reports.append(message.properties.get("priority"))
    assert sorted(reports) == [HANDOFF_PRIORITY, REPORT_PRIORITY], "a hand-off, then a report like any other"
