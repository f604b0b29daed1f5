"""Heartbeats at fleet scale (issue 16): a heartbeat that changes nothing costs one
query and no write; anything it changes, and the node being seen, still reach the
database in time."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.checks import run_checks
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agent import identity
from agent.shared.protocol import NodeReport, Snapshot
from nodes.models import Node
from updates import tasks as control_tasks

pytestmark = pytest.mark.django_db


@pytest.fixture
def node(make_node, agent_settings, settings):
    settings.TGP_SEEN_RESOLUTION = 30.0
    return make_node("gw")


def heartbeat(node: Node, **fields) -> dict:
    state = {"installed_version": "2.1.0", "boot_id": "b1", "agent_instance": "a1", "users": ("alice",), **fields}
    return identity.signed(node.hostname, "node_report", NodeReport(node.hostname, Snapshot(**state)).to_wire())


def report(envelope: dict) -> list[str]:
    """The SQL one heartbeat cost the control plane."""
    with CaptureQueriesContext(connection) as queries:
        control_tasks.node_report(envelope)
    return [q["sql"] for q in queries.captured_queries]


def writes(sql: list[str]) -> list[str]:
    return [q for q in sql if q.lstrip().upper().startswith(("UPDATE", "INSERT", "DELETE"))]


def test_a_heartbeat_that_changes_nothing_costs_one_query_and_no_write(node):
    assert writes(report(heartbeat(node))), "the first heartbeat stores the snapshot"
    seen = Node.objects.get(pk=node.pk).last_seen
    sql = report(heartbeat(node))
    assert len(sql) == 1 and not writes(sql), sql
    assert Node.objects.get(pk=node.pk).last_seen == seen


def test_a_heartbeat_that_changes_anything_is_stored_at_once(node):
    report(heartbeat(node))
    assert writes(report(heartbeat(node, users=("alice", "bob"))))
    assert Node.objects.get(pk=node.pk).logged_in_users == ["alice", "bob"]
    assert writes(report(heartbeat(node, users=("alice", "bob"), logon_enabled=False)))
    assert Node.objects.get(pk=node.pk).logon_enabled is False
    assert writes(report(heartbeat(node, users=("alice", "bob"), logon_enabled=False, agent_instance="a2")))
    assert Node.objects.get(pk=node.pk).agent_instance == "a2"


def test_last_seen_is_written_again_once_it_is_as_old_as_the_resolution(node):
    report(heartbeat(node))
    Node.objects.filter(pk=node.pk).update(last_seen=timezone.now() - timedelta(seconds=31))
    sql = writes(report(heartbeat(node)))
    assert len(sql) == 1 and "installed_packages" not in sql[0], "one narrow UPDATE: the snapshot is the same"
    assert timezone.now() - Node.objects.get(pk=node.pk).last_seen < timedelta(seconds=5)


def test_a_workers_report_is_always_stored(node):
    # It says that the worker takes work: a verify after a reboot waits for exactly this.
    report(heartbeat(node))
    assert writes(report(heartbeat(node, worker=True)))
    assert Node.objects.get(pk=node.pk).worker_instance == "a1"


def test_a_resolution_not_below_the_reconcilers_cutoff_is_a_configuration_error(settings):
    settings.TGP_RECONCILE_AFTER = 60.0
    settings.TGP_SEEN_RESOLUTION = 60.0
    assert "tgpadmin.E001" in [m.id for m in run_checks()]
    settings.TGP_SEEN_RESOLUTION = 30.0
    assert "tgpadmin.E001" not in [m.id for m in run_checks()]


@pytest.mark.django_db(transaction=True)
def test_a_control_worker_keeps_its_database_connection_from_task_to_task():
    # What the worker runs around every task: Celery's Django fix-up (as installed in a
    # worker process) and ours. Without CELERY_DB_REUSE_MAX the fix-up closes the
    # connection each time: a new PostgreSQL connection per heartbeat.
    from celery.fixups.django import DjangoWorkerFixup

    from tgpadmin.celery import _close_old_connections, app

    Node.objects.count()
    opened = connection.connection
    fixup = DjangoWorkerFixup(app)
    for _ in range(3):
        fixup.on_task_prerun(sender=control_tasks.node_report)
        _close_old_connections(sender=control_tasks.node_report)
        Node.objects.count()
        fixup.on_task_postrun(sender=control_tasks.node_report)
        _close_old_connections(sender=control_tasks.node_report)
    assert connection.connection is opened


@pytest.mark.django_db(transaction=True)
def test_a_control_worker_drops_a_connection_older_than_its_max_age(monkeypatch):
    import tgpadmin.celery as worker

    Node.objects.count()
    opened = connection.connection
    connection.close_at = 0  # as if CONN_MAX_AGE had passed
    monkeypatch.setattr(worker, "_next_check", 0.0)  # the second's check is due
    worker._close_old_connections(sender=control_tasks.node_report)
    Node.objects.count()
    assert connection.connection is not opened


@pytest.mark.django_db(transaction=True)
def test_a_control_worker_checks_its_connection_at_most_once_a_second_but_at_once_after_an_error(monkeypatch):
    # Django's own check (close_old_connections) costs a "SELECT 1" before the next
    # query where health checks are on: counted here where it is called.
    import django.db

    import tgpadmin.celery as worker

    calls = []
    monkeypatch.setattr(django.db, "close_old_connections", lambda: calls.append(1))
    monkeypatch.setattr(worker, "_next_check", 0.0)
    worker._close_old_connections(sender=control_tasks.node_report)
    assert len(calls) == 1, "the check of this second"
    for _ in range(5):
        worker._close_old_connections(sender=control_tasks.node_report)
    assert len(calls) == 1, "no more checks within the second"
    Node.objects.count()
    connection.errors_occurred = True  # a task hit a database error
    worker._close_old_connections(sender=control_tasks.node_report)
    assert len(calls) == 2, "checked at once after an error"
    connection.errors_occurred = False
