"""No state kept twice: where a run stands and how a node is are derived from the
rows that are the truth (the steps, the runs, the node's last report), and what the
appliance says about its maintenance mode is shown next to the database's decision."""

from __future__ import annotations

import time

import pytest
from django.urls import reverse
from django.utils import timezone

from nodes.models import Node
from updates.models import UpdateRun
from updates.runs import end, reports, snapshots, start

pytestmark = pytest.mark.django_db


@pytest.fixture
def run(make_node, releases, django_capture_on_commit_callbacks):
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0", last_seen=timezone.now())
    with django_capture_on_commit_callbacks(execute=False):
        return start.start_update(Node.objects.get(pk=node.pk), releases["2.2.0"])


def current_step(run: UpdateRun) -> str:
    annotated = UpdateRun.objects.with_current_step().get(pk=run.pk).current_step
    assert UpdateRun.objects.get(pk=run.pk).current_step == annotated, "the property and the annotation agree"
    return annotated


def test_a_runs_current_step_is_its_running_step_else_its_first_unfinished_one(run):
    assert current_step(run) == "notify", "nothing reported yet: the first step"
    reports.record_step(run.pk, "notify", "succeeded")
    assert current_step(run) == "download"
    # Reports may arrive out of order: a running step is where the run stands.
    reports.record_step(run.pk, "drain", "started")
    assert current_step(run) == "drain"
    assert end.complete_run(run.pk)
    assert current_step(run) == "", "every step done"


def test_a_failed_runs_current_step_is_the_step_it_failed_in(run):
    reports.record_step(run.pk, "notify", "succeeded")
    reports.record_step(run.pk, "download", "failed", detail="bad hash")
    assert current_step(run) == "download"


def test_a_nodes_status_is_derived_from_its_reports_and_its_runs(
    make_node, releases, django_capture_on_commit_callbacks
):
    node = make_node("gw")

    def status() -> str:
        annotated = Node.objects.with_status().get(pk=node.pk)
        assert annotated.status == Node.objects.get(pk=node.pk).status, "the property and the annotation agree"
        assert Node.objects.in_status(annotated.status).filter(pk=node.pk).exists(), "the list filter agrees"
        return annotated.status

    assert status() == Node.Status.NEVER_REPORTED
    snapshots.apply_snapshot(node.hostname, {"installed_version": "2.1.0", "taken_at": time.time()})
    assert status() == Node.Status.ONLINE
    with django_capture_on_commit_callbacks(execute=False):
        run = start.start_update(Node.objects.get(pk=node.pk), releases["2.2.0"])
    assert status() == Node.Status.UPDATING
    end.fail_run(run.pk, "boom")
    assert status() == Node.Status.ONLINE
    assert Node.objects.get(pk=node.pk).maintenance_mode, "and in maintenance: a failed run leaves it on"


def test_the_appliances_own_maintenance_mode_is_stored_and_shown_where_it_differs(admin_client, make_node):
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(maintenance_mode=True)
    list_url, page_url = reverse("admin:nodes_node_changelist"), reverse("admin:nodes_node_change", args=[node.pk])

    snapshots.apply_snapshot(node.hostname, {"maintenance": True, "taken_at": time.time()})
    assert Node.objects.get(pk=node.pk).reported_maintenance is True
    for url in (list_url, page_url):
        text = admin_client.get(url).text
        assert "maintenance on" in text and "maintenance-differs" not in text, url

    # Switched off on the appliance by hand, while the database still says on.
    snapshots.apply_snapshot(node.hostname, {"maintenance": False, "taken_at": time.time()})
    assert Node.objects.get(pk=node.pk).reported_maintenance is False
    for url in (list_url, page_url):
        text = admin_client.get(url).text
        assert '<span class="maintenance-differs" title="tgpadmin has maintenance mode on">' in text, url
        assert "&#9888; maintenance off" in text, url


def test_a_report_without_a_word_on_maintenance_says_nothing_about_it(make_node):
    node = make_node("gw")
    snapshots.apply_snapshot(node.hostname, {"installed_version": "2.1.0", "taken_at": time.time()})
    assert Node.objects.get(pk=node.pk).reported_maintenance is None
