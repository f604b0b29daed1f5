"""What the operator sees: the run page with its steps and download progress,
and list pages whose query count does not grow with the rows shown."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from nodes.models import Cluster, Node
from updates.models import UpdateRun, UpdateStep
from updates.runs import cluster_cap, locks, start

pytestmark = pytest.mark.django_db


def test_run_page_shows_steps_and_a_live_download_progress_bar(admin_client, make_node, releases):
    node = make_node("gw")
    run = UpdateRun.objects.create(node=node, release=releases["2.2.0"], message="m")
    for i, name in enumerate(start.plan_steps(node, run.trigger)):
        UpdateStep.objects.create(run=run, name=name, position=i)
    UpdateStep.objects.filter(run=run, name="notify").update(state="succeeded", detail="notice sent to 2 users")
    UpdateStep.objects.filter(run=run, name="download").update(state="running", bytes_done=512, bytes_total=1024)

    page = admin_client.get(reverse("admin:updates_updaterun_change", args=[run.pk]))
    assert page.status_code == 200
    assert '<progress max="100" value="50">' in page.text
    assert 'http-equiv="refresh"' in page.text, "a running run's page refreshes itself"
    assert "notice sent to 2 users" in page.text
    UpdateRun.objects.filter(pk=run.pk).update(state="succeeded")
    page = admin_client.get(reverse("admin:updates_updaterun_change", args=[run.pk]))
    assert 'http-equiv="refresh"' not in page.text


def _queries_for(client, url):
    with CaptureQueriesContext(connection) as ctx:
        assert client.get(url).status_code == 200
    return len(ctx)


def test_node_and_run_lists_use_a_fixed_number_of_queries(admin_client, releases):
    cluster = Cluster.objects.create(name="big")

    def add_nodes(start, count):
        for i in range(start, start + count):
            node = Node.objects.create(hostname=f"n{i}", cluster=cluster if i % 2 else None)
            UpdateRun.objects.create(node=node, release=releases["2.2.0"], state="failed")
            locks.set_lock(node, "failed")

    add_nodes(0, 3)
    few_nodes = _queries_for(admin_client, reverse("admin:nodes_node_changelist"))
    few_runs = _queries_for(admin_client, reverse("admin:updates_updaterun_changelist"))
    add_nodes(3, 30)
    assert _queries_for(admin_client, reverse("admin:nodes_node_changelist")) == few_nodes
    assert _queries_for(admin_client, reverse("admin:updates_updaterun_changelist")) == few_runs


def test_bad_cluster_cap_is_a_form_error_and_changes_nothing(admin_client):
    response = admin_client.post(
        reverse("admin:nodes_cluster_add"), {"name": "c9", "max_parallel_updates": 0, "lb_lead_time": "01:00:00"}
    )
    assert response.status_code == 200
    assert "Ensure this value is greater than or equal to 1" in response.text
    assert not Cluster.objects.exists()


def test_hostile_hostname_is_a_form_error(admin_client):
    response = admin_client.post(reverse("admin:nodes_node_add"), {"hostname": "../etc", "channel": "stable"})
    assert response.status_code == 200
    assert "Use a host name" in response.text
    assert not Node.objects.exists()


def test_a_download_warning_shows_in_the_title_bar_of_every_admin_page(admin_client, make_node):
    node = make_node("gw")
    pages = [
        reverse("admin:index"),
        reverse("admin:nodes_node_changelist"),
        reverse("admin:updates_updaterun_changelist"),
    ]
    for url in pages:
        assert "Update download error" not in admin_client.get(url).text
    Node.objects.filter(pk=node.pk).update(download_warning=True)
    for url in pages:
        assert '<span id="download-error"' in (text := admin_client.get(url).text), url
        assert f"Update download error: {node.hostname}" in text


def test_cluster_page_shows_slot_holders_and_update_group_releases_a_gone_holder(client, staff, make_node):
    cluster = Cluster.objects.create(name=f"slots-{make_node('x').pk}", max_parallel_updates=2)
    cluster_cap.cluster_slots().acquire(cluster.name, "ghost", 2)
    client.force_login(staff("viewer"))
    page = client.get(reverse("admin:nodes_cluster_change", args=[cluster.pk]))
    assert "ghost" in page.text and "1 of 2 held" in page.text
    assert (
        client.post(reverse("admin:nodes_cluster_release_slot", args=[cluster.pk]), {"node": "ghost"}).status_code
        == 403
    )
    client.force_login(staff("op", "update"))
    client.post(reverse("admin:nodes_cluster_release_slot", args=[cluster.pk]), {"node": "ghost"})
    assert cluster_cap.cluster_slots().holders(cluster.name) == []
