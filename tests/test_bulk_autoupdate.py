"""Auto-Update of many nodes at once, a whole cluster selected in the node list: the
confirmation page and the start cost the same queries for thirty nodes as for
three, a node that may not update is refused with its reason while the others
start, and each run starts as a single start would. Nothing here runs a node: the
chains go to the queues of nodes that no agent serves."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from nodes.models import Cluster, Node
from tests.conftest import accept_keys
from updates.models import UpdateLock, UpdateRun
from updates.runs import start
from updates.runs.chains import QueueChain, QueueStarted

pytestmark = pytest.mark.django_db
URL = reverse("admin:nodes_node_autoupdate")


@pytest.fixture
def operator(client, staff, releases):
    client.force_login(staff("op", "update"))
    return client


def cluster_of(count: int) -> list[Node]:
    cluster = Cluster.objects.create(name=f"bulk-{uuid.uuid4().hex[:6]}", max_parallel_updates=2)
    nodes = Node.objects.bulk_create(
        Node(hostname=f"{cluster.name}-{i}", cluster=cluster, installed_version="2.1.0", logged_in_users=["alice"])
        for i in range(count)
    )
    accept_keys(nodes)
    return nodes


def ids(nodes: list[Node]) -> str:
    return ",".join(str(node.pk) for node in nodes)


def confirmation_queries(client, nodes: list[Node]) -> int:
    with CaptureQueriesContext(connection) as queries:
        page = client.get(f"{URL}?ids={ids(nodes)}")
    assert page.status_code == 200
    assert page.text.count('class="planned"') == len(nodes)
    return len(queries)


def start_queries(client, nodes: list[Node], capture) -> int:
    with CaptureQueriesContext(connection) as queries, capture(execute=True):  # the chains are queued too
        response = client.post(URL, {"ids": ids(nodes), "confirm": "yes"})
    assert response.status_code == 302
    assert UpdateRun.objects.filter(node__in=nodes, state=UpdateRun.State.RUNNING).count() == len(nodes)
    return len(queries)


def test_confirming_autoupdate_of_thirty_nodes_costs_the_queries_of_three(operator):
    confirmation_queries(operator, cluster_of(1))  # warm: the session, content types
    assert confirmation_queries(operator, cluster_of(30)) == confirmation_queries(operator, cluster_of(3))


def test_starting_autoupdate_of_thirty_nodes_costs_no_more_queries_per_node_than_of_three(
    operator, django_capture_on_commit_callbacks
):
    start_queries(operator, cluster_of(1), django_capture_on_commit_callbacks)
    few = start_queries(operator, cluster_of(3), django_capture_on_commit_callbacks)
    many = start_queries(operator, cluster_of(30), django_capture_on_commit_callbacks)
    # SQLite takes 999 parameters per query: 240 steps are inserted in two batches.
    assert many - few <= 2, "a start costs no query per node"


def test_a_locked_node_is_refused_with_its_reason_while_the_rest_of_its_cluster_starts(
    operator, django_capture_on_commit_callbacks
):
    nodes = cluster_of(4)
    UpdateLock.objects.create(node=nodes[2], reason="download failed 20 times")
    with django_capture_on_commit_callbacks(execute=False):
        response = operator.post(URL, {"ids": ids(nodes), "confirm": "yes"})
    shown = [str(m) for m in get_messages(response.wsgi_request)]
    assert f"{nodes[2]} has an update lock (download failed 20 times); remove it first." in shown
    assert "Auto-Update started on 3 node(s)." in shown
    assert not UpdateRun.objects.filter(node=nodes[2]).exists()
    assert UpdateRun.objects.filter(node__in=nodes).count() == 3


def test_each_run_of_a_bulk_start_is_what_a_single_start_makes(operator, django_capture_on_commit_callbacks):
    single, *bulk = cluster_of(3)
    with django_capture_on_commit_callbacks(execute=False) as queued:
        operator.post(URL, {"ids": ids(bulk), "confirm": "yes"})
        alone = start.start_update(single, start.StartChecks.read([single]).newest["stable"])
    started = [QueueChain(UpdateRun.objects.get(node=node).pk, "notify") for node in bulk]
    assert queued == [QueueStarted(tuple(started)), QueueStarted((QueueChain(alone.pk, "notify"),))], (
        "one hand-off per start, queued once the transaction has committed"
    )
    expected = list(alone.steps.values_list("name", flat=True))
    for node in bulk:
        node.refresh_from_db()
        run = UpdateRun.objects.get(node=node)
        assert list(run.steps.values_list("name", flat=True)) == expected
        assert (run.release, run.message, run.version_before) == (alone.release, alone.message, "2.1.0")
        assert run.started_by.username == "op"
        assert node.maintenance_mode and node.updating
        assert node.maintenance_reason == f"Update to 2.2.0 (run {run.pk})"


def test_a_node_named_twice_starts_once(releases):
    (node,) = cluster_of(1)
    release = releases["2.2.0"]
    runs, refused = start.start_updates([(node, release), (node, release)])
    assert len(runs) == 1
    assert refused == [f"{node} is already updating."]


def test_selecting_every_node_of_a_large_fleet_confirms_without_their_ids_in_a_url(
    operator, django_capture_on_commit_callbacks
):
    # "Select all" across pages: the action gets every node, not only the page's.
    # Their ids go into the page's form, not into a redirect's URL: for a fleet of
    # thousands that URL outgrows the 8 KB request line a proxy such as nginx accepts.
    nodes = cluster_of(1200)
    select_all = {"action": "autoupdate", "select_across": "1", "_selected_action": [nodes[0].pk]}
    page = operator.post(reverse("admin:nodes_node_changelist"), select_all)
    assert page.status_code == 200 and "Location" not in page
    assert page.text.count('class="planned"') == 1200
    assert f'<form method="post" action="{URL}">' in page.text
    with django_capture_on_commit_callbacks(execute=False):
        operator.post(URL, {"ids": page.context["ids"], "confirm": "yes"})
    assert UpdateRun.objects.filter(node__in=nodes).count() == 1200
