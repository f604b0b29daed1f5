"""The control worker's log: every task it runs is there, except the heartbeats
that every node sends all the time (they would bury the rest)."""

from __future__ import annotations

import pytest

from agent import identity
from agent import tasks as node_tasks
from agent.shared.protocol import RECORD_STEP, StepReport
from nodes.models import Node
from tests.conftest import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workflow, pytest.mark.timeout(120)]


def test_heartbeats_do_not_flood_the_control_log(make_node, agent_for, control_worker, agent_settings):
    node = make_node("gw")
    agent_for(node)  # a heartbeat every 0.5 s in the tests
    for _ in range(3):
        seen = Node.objects.get(pk=node.pk).last_seen
        wait_for(lambda s=seen: Node.objects.get(pk=node.pk).last_seen > s, 30, "a heartbeat to be processed")
    # Any other task still shows: a report about a run that does not exist.
    report = StepReport(run=1_000_000, step="notify", event="progress", hostname=node.hostname, at=0)
    node_tasks.send_to_control(RECORD_STEP, identity.signed(node.hostname, "report", report.to_wire()))
    wait_for(lambda: "Task control.record_step[" in control_worker.log_path.read_text(), 30, "the report in the log")

    assert "Task control.node_report[" not in control_worker.log_path.read_text()
