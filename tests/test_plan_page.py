"""The plan of a cluster schedule on its page and on the cluster's page: a picture
(server-rendered SVG) and a table of each node's times; group `update` moves a node
or leaves it out of one occurrence within the bounds, and anybody else gets 403."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from datetime import timedelta

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from nodes.models import Cluster
from updates import plans
from updates.models import LeftSchedule, PlanEntry, UpdatePlan, UpdateRun, UpdateSchedule, UpdateStep
from updates.runs import locks
from updates.timeline import actual_times, timeline_svg

pytestmark = pytest.mark.django_db
MIN = timedelta(minutes=1)
FMT = "%Y-%m-%d %H:%M:%S"


@pytest.fixture
def cluster(db):
    return Cluster.objects.create(
        name=f"plan-{uuid.uuid4().hex[:8]}", max_parallel_updates=2, lb_lead_time=timedelta(hours=1),
        expected_update=timedelta(minutes=30),
    )  # fmt: skip


@pytest.fixture
def occurrence():
    """A one-off date two days ahead at 03:00, server time: far enough that every move is before it starts."""
    return (timezone.localtime() + timedelta(days=2)).replace(hour=3, minute=0, second=0, microsecond=0)


@pytest.fixture
def nodes(cluster, make_node, releases):
    return sorted((make_node("gw", cluster=cluster) for _ in range(4)), key=lambda n: n.hostname)


@pytest.fixture
def schedule(cluster, occurrence, nodes):
    return UpdateSchedule.objects.create(name="nightly", cluster=cluster, run_at=occurrence)


@pytest.fixture
def operator(client, staff):
    client.force_login(staff("op", "update"))
    return client


def page_url(schedule):
    return reverse("admin:updates_updateschedule_change", args=[schedule.pk])


def url(schedule, name):
    return reverse(f"admin:updates_updateschedule_plan_{name}", args=[schedule.pk])


def local(moment):
    return timezone.localtime(moment).strftime(FMT)


def said(response):
    """The message the request left (messages of earlier requests stay until a page shows them)."""
    return [str(m) for m in get_messages(response.wsgi_request)][-1]


def move(client, schedule, occurrence, node, when, **extra):
    data = {"occurrence": occurrence.isoformat(), "node": node.pk, "planned_at": when.strftime("%Y-%m-%dT%H:%M:%S")}
    return client.post(url(schedule, "move"), {**data, **extra})


def exclude(client, schedule, occurrence, node, excluded="1"):
    data = {"occurrence": occurrence.isoformat(), "node": node.pk, "excluded": excluded}
    return client.post(url(schedule, "exclude"), data)


def planned(schedule, occurrence):
    """Stored entries: hostname -> (planned_at, excluded)."""
    rows = PlanEntry.objects.filter(plan__schedule=schedule, plan__occurrence=occurrence)
    return {e.node.hostname: (e.planned_at, e.excluded) for e in rows.select_related("node")}


def test_the_schedule_page_shows_the_picture_and_each_nodes_times(operator, schedule, occurrence, nodes):
    page = operator.get(page_url(schedule))
    assert page.status_code == 200
    text = page.text
    assert '<svg xmlns="http://www.w3.org/2000/svg" class="plan-timeline"' in text
    # cap 2, 30-minute updates: two nodes at T, two when those are back; each out 1 hour before.
    first, second = occurrence, occurrence + 30 * MIN
    times = [first, first, second, second]
    for node, at in zip(nodes, times, strict=True):
        row = text.split(f'data-node="{node.hostname}"')[1].split("</tr>")[0]
        assert f'<td class="out-at">{local(at - 60 * MIN)}</td>' in row
        assert f'<td class="planned-at">{local(at)}</td>' in row
        assert f'<td class="back-at">{local(at + 30 * MIN)}</td>' in row
        # the picture: a titled bar per node and phase
        assert f"<title>{node.hostname}: users logged off, updating" in text
        assert f"<title>{node.hostname}: out of the load balancer" in text
    assert "<title>bound: at most 2 updating</title>" in text, "the cap is drawn"
    assert "<title>bound: at most 4 out of LB</title>" in text, "the bound out of the load balancer is drawn"
    assert "planned peak 2" in text
    assert not UpdatePlan.objects.exists(), "looking stores nothing"


def test_the_cluster_page_shows_the_plans_of_its_schedules(operator, cluster, schedule, occurrence, nodes):
    UpdateSchedule.objects.create(name="weekly", cluster=cluster, cron="0 4 * * 0")
    page = operator.get(reverse("admin:nodes_cluster_change", args=[cluster.pk]))
    assert page.status_code == 200
    assert page.text.count('class="plan-timeline"') == 2
    assert f"Plan of nightly for {occurrence:%Y-%m-%d %H:%M}" in page.text
    assert f'<td class="planned-at">{local(occurrence + 30 * MIN)}</td>' in page.text
    assert page.text.count(f'data-node="{nodes[0].hostname}"') == 2


def test_actual_times_show_under_the_plan(operator, schedule, occurrence, nodes, releases):
    node = nodes[0]
    run = UpdateRun.objects.create(node=node, release=releases["2.2.0"], schedule=schedule, scheduled_for=occurrence,
                                   trigger="scheduled", state="succeeded")  # fmt: skip
    out, off, back = occurrence - 58 * MIN, occurrence + 1 * MIN, occurrence + 25 * MIN
    for position, (name, started, finished) in enumerate(
        [("exclude", out, out), ("drain", off, off), ("resume", back - MIN, back)]
    ):
        UpdateStep.objects.create(run=run, name=name, position=position, state="succeeded", started_at=started,
                                  finished_at=finished)  # fmt: skip
    text = operator.get(page_url(schedule)).text
    row = text.split(f'data-node="{node.hostname}"')[1].split("</tr>")[0]
    assert f'<td class="actual-out">{timezone.localtime(out):%H:%M:%S}</td>' in row
    assert f'<td class="actual-off">{timezone.localtime(off):%H:%M:%S}</td>' in row
    assert f'<td class="actual-back">{timezone.localtime(back):%H:%M:%S}</td>' in row
    assert 'class="actual-off"' in text and f"<title>{node.hostname}: users logged off" in text
    assert text.count('class="actual-out" x=') == 1, "only the node that ran has an actual bar"


def test_an_operator_moves_a_node_within_the_bounds_and_the_page_shows_it(operator, schedule, occurrence, nodes):
    later = occurrence + 2 * timedelta(hours=1)
    response = move(operator, schedule, occurrence, nodes[2], later)
    assert response.status_code == 302 and response["Location"] == page_url(schedule)
    assert said(response) == f"{nodes[2].hostname} now updates at {local(later)}."
    assert planned(schedule, occurrence)[nodes[2].hostname] == (later, False), "the first change stores the plan"
    entry = PlanEntry.objects.get(node=nodes[2])
    assert entry.note == "moved by op" and entry.changed_by.username == "op"
    row = operator.get(page_url(schedule)).text.split(f'data-node="{nodes[2].hostname}"')[1].split("</tr>")[0]
    assert f'<td class="planned-at">{local(later)}</td>' in row
    assert "moved by op" in row


def test_a_move_beyond_the_bounds_is_refused_with_the_reason_and_changes_nothing(operator, schedule, occurrence, nodes):
    response = move(operator, schedule, occurrence, nodes[2], occurrence)  # a third node updating at T
    assert response.status_code == 302
    assert said(response) == (
        f"{nodes[2].hostname} cannot update at {occurrence:%Y-%m-%d %H:%M}: "
        "3 nodes would be updating at once (at most 2)."
    )
    assert not UpdatePlan.objects.exists(), "a refused first change does not store the plan either"
    plans.ensure_plan(schedule, occurrence)
    before = planned(schedule, occurrence)
    response = move(operator, schedule, occurrence, nodes[2], occurrence - 5 * MIN)
    assert "before the occurrence" in said(response)
    assert planned(schedule, occurrence) == before


def test_leaving_a_node_out_and_putting_it_back(operator, schedule, occurrence, nodes):
    response = exclude(operator, schedule, occurrence, nodes[1])
    assert said(response) == f"{nodes[1].hostname} is left out of the plan."
    assert planned(schedule, occurrence)[nodes[1].hostname][1] is True
    text = operator.get(page_url(schedule)).text
    row = text.split(f'data-node="{nodes[1].hostname}"')[1].split("</tr>")[0]
    assert "(left out)" in row and "Put back</button>" in row and 'name="planned_at"' not in row
    assert f"<title>{nodes[1].hostname}: left out of this occurrence: left out by op</title>" in text
    response = exclude(operator, schedule, occurrence, nodes[1], "0")
    assert said(response) == f"{nodes[1].hostname} is back in the plan."
    assert planned(schedule, occurrence)[nodes[1].hostname][1] is False


def test_putting_back_a_node_that_does_not_fit_is_refused(operator, schedule, occurrence, nodes):
    plans.ensure_plan(schedule, occurrence)
    exclude(operator, schedule, occurrence, nodes[0])
    move(operator, schedule, occurrence, nodes[2], occurrence)  # takes the place nodes[0] left
    assert planned(schedule, occurrence)[nodes[2].hostname][0] == occurrence
    response = exclude(operator, schedule, occurrence, nodes[0], "0")
    assert "does not fit back at its time: 3 nodes would be updating at once (at most 2)" in said(response)
    assert planned(schedule, occurrence)[nodes[0].hostname][1] is True


@pytest.mark.parametrize("name", ["move", "exclude", "put-back"])
@pytest.mark.parametrize("group", ["maint", None])
def test_every_change_is_403_without_the_update_permission(client, staff, schedule, occurrence, nodes, name, group):
    LeftSchedule.objects.create(schedule=schedule, node=nodes[3], reason="download failed twice")
    client.force_login(staff("someone", group))
    data = {"occurrence": occurrence.isoformat(), "node": nodes[3].pk, "planned_at": "2099-01-01T03:00",
            "excluded": "1"}  # fmt: skip
    assert client.post(url(schedule, name), data).status_code == 403
    assert not UpdatePlan.objects.exists() and LeftSchedule.objects.count() == 1
    assert client.get(url(schedule, name)).status_code == 403


def test_the_forms_show_only_for_the_update_group(client, staff, cluster, schedule):
    client.force_login(staff("maintainer", "maint"))
    page = client.get(reverse("admin:nodes_cluster_change", args=[cluster.pk]))
    assert page.status_code == 200 and 'class="plan-timeline"' in page.text
    assert 'name="planned_at"' not in page.text and "Leave out</button>" not in page.text


def test_bad_input_changes_nothing_and_says_why(operator, cluster, schedule, occurrence, nodes, make_node):
    stranger = make_node("gw")  # a node of no plan
    cases = [
        (move(operator, schedule, occurrence, nodes[2], occurrence, planned_at="tomorrow"), "is not a time"),
        (move(operator, schedule, occurrence, stranger, occurrence + 3 * timedelta(hours=1)), "No such node"),
        (move(operator, schedule, occurrence + MIN, nodes[2], occurrence + 3 * timedelta(hours=1)), "has no plan for"),
        (
            operator.post(
                url(schedule, "move"), {"occurrence": "soon", "node": nodes[2].pk, "planned_at": "2099-01-01T03:00"}
            ),
            "is not an occurrence",
        ),
        (exclude(operator, schedule, occurrence, nodes[2], "maybe"), "Say whether"),
        (operator.get(url(schedule, "move")), "made with the page's buttons"),
    ]
    for response, why in cases:
        assert response.status_code == 302
        assert why in said(response)
    assert not UpdatePlan.objects.exists()
    # an entry of another schedule's plan
    other_cluster = Cluster.objects.create(name=f"other-{uuid.uuid4().hex[:6]}", max_parallel_updates=2)
    other_node = make_node("gw", cluster=other_cluster)
    other = UpdateSchedule.objects.create(name="other", cluster=other_cluster, run_at=occurrence)
    plans.ensure_plan(other, occurrence)
    plans.ensure_plan(schedule, occurrence)
    before = {**planned(schedule, occurrence), **planned(other, occurrence)}
    response = move(operator, schedule, occurrence, other_node, occurrence + 3 * timedelta(hours=1))
    assert "No such node in the plan of nightly" in said(response)
    assert {**planned(schedule, occurrence), **planned(other, occurrence)} == before


def test_a_node_that_left_the_schedule_is_shown_and_put_back_once_its_lock_is_gone(
    operator, schedule, occurrence, nodes
):
    LeftSchedule.objects.create(schedule=schedule, node=nodes[3], reason="download failed twice")
    locks.set_lock(nodes[3], "download failed twice")
    text = operator.get(page_url(schedule)).text
    left = text.split('class="plan-left-schedule"')[1].split("</table>")[0]
    assert nodes[3].hostname in left and "download failed twice" in left and "Put back into the schedule" in left
    assert f'data-node="{nodes[3].hostname}"' not in text, "not in the plan"
    response = operator.post(url(schedule, "put-back"), {"node": nodes[3].pk})
    assert said(response) == f"{nodes[3].hostname} has an update lock: remove it first (the node's page)."
    assert LeftSchedule.objects.filter(node=nodes[3]).exists()
    locks.remove_lock(nodes[3], None)
    next_page = reverse("admin:nodes_cluster_change", args=[schedule.cluster_id])
    response = operator.post(url(schedule, "put-back"), {"node": nodes[3].pk, "next": next_page})
    assert response["Location"] == next_page, "back to the page the form was on"
    assert said(response) == f"{nodes[3].hostname} is back in nightly."
    assert not LeftSchedule.objects.exists()
    assert f'data-node="{nodes[3].hostname}"' in operator.get(page_url(schedule)).text


def test_a_redirect_goes_nowhere_else_than_this_site(operator, schedule, occurrence, nodes):
    data = {"occurrence": occurrence.isoformat(), "node": nodes[0].pk, "excluded": "1", "next": "https://evil.example/"}
    response = operator.post(url(schedule, "exclude"), data)
    assert response["Location"] == page_url(schedule)


def test_names_and_notes_are_escaped_in_the_picture_and_the_table(operator, schedule, occurrence, nodes):
    UpdateSchedule.objects.filter(pk=schedule.pk).update(name="<b>nightly</b>")
    plans.ensure_plan(schedule, occurrence)
    PlanEntry.objects.filter(node=nodes[0]).update(note="<script>alert(1)</script>", excluded=True)
    text = operator.get(page_url(schedule)).text
    assert "<script>alert(1)" not in text and "<b>nightly" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    schedule.refresh_from_db()
    preview = plans.preview(schedule, occurrence)
    svg = timeline_svg(preview, actual_times(schedule.pk, occurrence))
    assert "<script>" not in svg and "<b>" not in svg
    tree = ET.fromstring(svg)  # well-formed XML: nothing unescaped broke it
    titles = [t.text or "" for t in tree.iter("{http://www.w3.org/2000/svg}title")]
    assert f"{nodes[0].hostname}: left out of this occurrence: <script>alert(1)</script>" in titles, "text, not markup"


def _queries(client, path):
    with CaptureQueriesContext(connection) as ctx:
        assert client.get(path).status_code == 200
    return len(ctx)


@pytest.mark.parametrize("stored", [False, True])
def test_the_pages_queries_do_not_grow_with_the_nodes(
    operator, cluster, schedule, occurrence, make_node, releases, django_assert_max_num_queries, stored
):
    def add_nodes(count, left=1):
        for _ in range(left):  # nodes that left the schedule are listed too
            LeftSchedule.objects.create(schedule=schedule, node=make_node("gw", cluster=cluster), reason="failed twice")
        for _ in range(count):
            node = make_node("gw", cluster=cluster)
            run = UpdateRun.objects.create(node=node, release=releases["2.2.0"], schedule=schedule,
                                           scheduled_for=occurrence, trigger="scheduled", state="running")  # fmt: skip
            UpdateStep.objects.create(run=run, name="exclude", position=0, state="running", started_at=occurrence)
        UpdatePlan.objects.filter(schedule=schedule).delete()
        if stored:
            plans.ensure_plan(schedule, occurrence)

    pages = [page_url(schedule), reverse("admin:nodes_cluster_change", args=[cluster.pk])]
    add_nodes(0)
    few = [_queries(operator, path) for path in pages]
    add_nodes(12, left=3)
    for path, count in zip(pages, few, strict=True):
        with django_assert_max_num_queries(count):
            page = operator.get(path)
        assert page.text.count('class="plan-entry') >= 16


def test_a_plan_under_way_is_shown_until_its_nodes_are_expected_back(operator, cluster, nodes):
    schedule = UpdateSchedule.objects.create(name="daily", cluster=cluster, cron="0 3 * * *")
    began = timezone.localtime().replace(second=0, microsecond=0) - 10 * MIN
    plans.ensure_plan(schedule, began)  # nodes at began and began + 30 min, back 30 min later
    text = operator.get(page_url(schedule)).text
    assert f"Plan of daily for {began:%Y-%m-%d %H:%M}" in text and "Stored plan." in text
    PlanEntry.objects.filter(plan__schedule=schedule).update(planned_at=began - 2 * timedelta(hours=1))
    text = operator.get(page_url(schedule)).text
    assert f"Plan of daily for {began:%Y-%m-%d %H:%M}" not in text, "all back: the next occurrence"
    assert "Preview:" in text


@pytest.mark.parametrize(
    ("change", "why"),
    [({"time_control": False}, "Time control is off."), ({"download_only": True}, "Download only: no update")],
)
def test_no_plan_without_an_update_and_the_page_says_why(operator, schedule, change, why):
    UpdateSchedule.objects.filter(pk=schedule.pk).update(**change)
    text = operator.get(page_url(schedule)).text
    assert why in text and 'class="plan-timeline"' not in text
