"""Maintenance mode around an update: notices ahead of time and the end of
maintenance after a failed run, through real agents."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from agent.drivers.simulated import SimulatedDriver
from nodes import services
from nodes.models import Node
from tests.conftest import wait_for
from updates.models import MaintenanceNotice
from updates.runs import locks

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workflow, pytest.mark.timeout(120)]


def test_announced_maintenance_reaches_every_logged_in_user(make_node, agent_for, state_dir, staff):
    node = make_node("gw", users=("alice", "bob"))
    agent_for(node)
    starts = timezone.now() + timedelta(hours=2)
    services.announce([node], "Update tonight, please save your work", starts, staff("op", "update"))

    driver = SimulatedDriver(node.hostname, state_dir / node.hostname)

    def inboxes() -> dict:
        sessions = driver.read()["sessions"]
        return {user: [n["message"] for n in s["inbox"]] for user, s in sessions.items() if s["inbox"]}

    got = wait_for(lambda: len(inboxes()) == 2 and inboxes(), 30, "the notice in both inboxes")
    assert all("Update tonight, please save your work" in msgs[0] for msgs in got.values())
    assert MaintenanceNotice.objects.get(node=node).created_by.username == "op"
    assert driver.read()["logon_enabled"] is True, "an announcement changes nothing else"


def test_ending_maintenance_after_a_failed_run_releases_logon_on_the_node(make_node, agent_for, state_dir):
    node = make_node("gw")
    agent_for(node)
    driver = SimulatedDriver(node.hostname, state_dir / node.hostname)
    driver.notify("run-x", "maintenance")
    driver.drain(0)  # what a failed run leaves behind
    Node.objects.filter(pk=node.pk).update(maintenance_mode=True, maintenance_reason="run failed")
    locks.set_lock(node, "run failed")

    assert services.end_maintenance(Node.objects.get(pk=node.pk))
    wait_for(lambda: driver.read()["logon_enabled"], 30, "logon to be switched on again")
    assert driver.read()["maintenance"] is False
    node.refresh_from_db()
    assert not node.maintenance_mode
    assert locks.active_lock(node), "ending maintenance does not remove the update lock"
