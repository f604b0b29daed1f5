"""The fleet overview on the admin's home page: its counts against a fleet built here
(nodes in every state, runs, schedules, slots held in Redis), every link leading to
a list of exactly as many rows as it says, and a page whose query count does not grow
with the fleet. Database and Redis only: no workers, no agents."""

from __future__ import annotations

import html
import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.contrib import admin
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from agent.shared.protocol import OUT_PREFIX, SLOT_PREFIX
from nodes.models import Cluster, Node
from tests.servers import free_port
from updates import overview
from updates.models import Release, UpdateLock, UpdateRun, UpdateSchedule, UpdateStep
from updates.schedules import next_firing
from updates.slots import ClusterSlots

pytestmark = pytest.mark.django_db

INDEX = "/admin/"
LINK = re.compile(r'<a[^>]*\shref="([^"]+)"[^>]*\sdata-count="(\d+)"')


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def broker(settings: Any, redis_url: str):
    """A Redis database of this file's own on the session's server, as the web's broker."""
    base, db = redis_url.rsplit("/", 1)
    settings.REDIS_URL = url = f"{base}/{13 if db == '12' else 12}"
    client = redis.Redis.from_url(url)
    yield client
    for prefix in (SLOT_PREFIX, OUT_PREFIX):
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)


@pytest.fixture
def heartbeats(settings: Any) -> None:
    settings.TGP_HEARTBEAT_INTERVAL = 15.0
    settings.TGP_SEEN_RESOLUTION = 30.0  # silent: not seen for 3 x 15 + 30 = 75 s


def add_node(seen: float | None = 0, version: str = "2.2.0", channel: str = "stable", **fields: Any) -> Node:
    """A node last seen `seen` seconds ago (None: never reported)."""
    last_seen = None if seen is None else timezone.now() - timedelta(seconds=seen)
    return Node.objects.create(
        hostname=unique("gw"), installed_version=version, channel=channel, last_seen=last_seen, **fields
    )


def add_run(node: Node, state: str, hours_ago: float = 1, **fields: Any) -> UpdateRun:
    run = UpdateRun.objects.create(node=node, release=Release.objects.get(version="2.2.0"), state=state, **fields)
    UpdateRun.objects.filter(pk=run.pk).update(created_at=timezone.now() - timedelta(hours=hours_ago))
    return run


@pytest.fixture
def fleet(broker: redis.Redis, heartbeats: None) -> dict[str, Any]:
    for version, channel in [("2.0.0", "oldstable"), ("2.0.1", "oldstable"), ("2.1.0", "stable"), ("2.2.0", "stable")]:
        Release.objects.create(version=version, channel=channel)
    # Newer, but withdrawn: never the newest, so nobody is behind it.
    Release.objects.create(version="2.10.0", channel="stable", withdrawn_at=timezone.now())
    cluster = Cluster.objects.create(name=unique("c"), max_parallel_updates=2, max_out_of_lb=3)
    idle = Cluster.objects.create(name=unique("idle"))
    nodes = {
        "current": add_node(),
        "current_old": add_node(version="2.0.1", channel="oldstable"),
        "on_withdrawn": add_node(version="2.10.0"),  # neither behind nor up to date
        "behind_old": add_node(version="2.0.0", channel="oldstable"),
        "stable_on_old": add_node(version="2.0.1"),  # oldstable's newest, behind on stable
        "locked": add_node(version="2.1.0"),
        "warned": add_node(seen=600, version="2.1.0", download_warning=True),  # silent too
        "late": add_node(seen=60),  # past 3 heartbeats, not past the resolution on top
        "maintenance": add_node(maintenance_mode=True, cluster=cluster),
        "updating": add_node(version="2.1.0", cluster=cluster, maintenance_mode=True),
        "waiting": add_node(version="2.1.0", cluster=cluster, maintenance_mode=True),
        "never": add_node(seen=None, version=""),
    }
    UpdateLock.objects.create(node=nodes["locked"], reason="failed")
    UpdateLock.objects.create(node=nodes["warned"], reason="history", removed_at=timezone.now())
    add_run(nodes["updating"], "running")
    waiting = add_run(nodes["waiting"], "running")
    UpdateStep.objects.create(run=waiting, name="notify", position=0, state="succeeded")
    UpdateStep.objects.create(run=waiting, name="slot", position=1, state="running")
    add_run(nodes["current"], "succeeded", hours_ago=3)
    add_run(nodes["locked"], "failed", hours_ago=2)
    add_run(nodes["late"], "cancelled", hours_ago=23)
    add_run(nodes["current"], "failed", hours_ago=25)  # before the window
    add_run(nodes["current_old"], "succeeded", hours_ago=24 * 30)

    slots, places = ClusterSlots(broker), ClusterSlots(broker, OUT_PREFIX)
    assert slots.acquire(cluster.name, nodes["updating"].hostname, 2) is not None
    for name in ("updating", "waiting"):
        assert places.acquire(cluster.name, nodes[name].hostname, 3) is not None

    single = add_node(version="2.2.0")
    nightly = UpdateSchedule.objects.create(name="nightly", cluster=cluster, cron="0 3 * * *", timezone="Europe/Berlin")
    once = UpdateSchedule.objects.create(
        name="once", node=single, run_at=timezone.now() + timedelta(hours=30, minutes=30)
    )
    UpdateSchedule.objects.create(name="off", cluster=idle, cron="* * * * *", time_control=False)
    UpdateSchedule.objects.create(name="fetch", cluster=idle, cron="* * * * *", download_only=True)
    return {"cluster": cluster, "idle": idle, "single": single, "nightly": nightly, "once": once, **nodes}


def counts(o: overview.Overview) -> dict[str, int]:
    return {tile.label: tile.count for tile in o.states}


def test_the_overview_counts_the_fleet_by_state(fleet):
    o = overview.compute()
    assert o.nodes.count == 13
    assert counts(o) == {
        "up to date": 5,  # current, current_old, late, maintenance, single; not the one on a withdrawn 2.10.0
        "behind its channel": 6,
        "updating": 2,  # a run under way; the one waiting for a slot is updating too
        "waiting for a cluster slot": 1,
        "in maintenance mode": 3,
        "locked": 1,  # the removed lock is history
        "download warning": 1,
        "silent": 1,  # 600 s; 60 s is within 3 x 15 + 30
        "never reported": 1,
    }
    behind = o.state("behind its channel")
    assert {part.label: part.count for part in behind.parts} == {"stable": 5, "oldstable": 1}
    assert {v.version: (v.count, v.newest_of) for v in o.versions} == {
        "2.10.0": (1, ()),
        "2.2.0": (4, ("stable",)),
        "2.1.0": (4, ()),
        "2.0.1": (2, ("oldstable",)),
        "2.0.0": (1, ()),
        "": (1, ()),
    }
    assert [v.version for v in o.versions] == ["2.10.0", "2.2.0", "2.1.0", "2.0.1", "2.0.0", ""]


def test_clusters_show_their_slot_use_from_redis(fleet):
    o = overview.compute()
    assert o.broker_up
    by_name = {use.cluster.name: use for use in o.clusters}
    busy, idle = by_name[fleet["cluster"].name], by_name[fleet["idle"].name]
    assert (busy.nodes, busy.slots, busy.places) == (3, "1 / 2", "2 / 3")
    assert (idle.nodes, idle.slots, idle.places) == (0, "0 / 1", "0 / 2")


def test_a_broker_that_does_not_answer_makes_the_slot_use_unknown_not_the_page_fail(admin_client, fleet, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    page = admin_client.get(INDEX)
    assert page.status_code == 200
    o = page.context["overview"]
    assert not o.broker_up
    assert {use.slots for use in o.clusters} == {"unknown / 2", "unknown / 1"}
    assert 'id="broker-down"' in page.text
    assert o.state("locked").count == 1  # the database's counts stand


def test_the_next_scheduled_updates_across_schedules_link_to_their_plans(fleet):
    now = timezone.now()
    o = overview.compute(now)
    # Each schedule's next update, soonest first: not the one switched off, nor the download-only one.
    assert [occ.schedule.name for occ in o.next_updates] == ["nightly", "once"]
    nightly_at = next_firing(fleet["nightly"], "update", now).update_at  # as its entry was armed
    assert [occ.at for occ in o.next_updates] == [nightly_at, fleet["once"].run_at]
    nightly = next(occ for occ in o.next_updates if occ.schedule.name == "nightly")
    assert nightly.url.endswith(f"/change/#plan-{nightly.schedule.pk}-section")
    assert nightly.target == f"cluster {fleet['cluster']}"


def test_the_runs_of_the_last_day_by_outcome_and_the_latest(fleet):
    o = overview.compute()
    assert o.runs.total.count == 5
    assert {t.label: t.count for t in o.runs.by_state} == {"Running": 2, "Succeeded": 1, "Failed": 1, "Cancelled": 1}
    assert [run.created_at for run in o.runs.latest] == sorted((r.created_at for r in o.runs.latest), reverse=True)
    assert len(o.runs.latest) == 5


def links(page: Any) -> list[tuple[str, int]]:
    found = [(html.unescape(url), int(count)) for url, count in LINK.findall(page.text)]
    assert found, "the overview shows no counted links"
    return found


def test_every_count_on_the_page_leads_to_a_list_of_exactly_that_many(admin_client, fleet):
    page = admin_client.get(INDEX)
    assert page.status_code == 200
    found = links(page)
    o = page.context["overview"]
    expected = (
        1 + len(o.states) + sum(len(t.parts) for t in o.states) + len(o.versions) + len(o.clusters)
        + 1 + len(o.runs.by_state)
    )  # fmt: skip
    assert len(found) == expected
    assert {url.split("?")[0] for url, _ in found} == {
        reverse("admin:nodes_node_changelist"),
        reverse("admin:updates_updaterun_changelist"),
    }
    for url, count in found:
        listed = admin_client.get(url)
        assert listed.status_code == 200, url
        assert listed.context["cl"].result_count == count, url
    assert (f"{reverse('admin:nodes_node_changelist')}?state=silent", 1) in found
    assert (f"{reverse('admin:nodes_node_changelist')}?installed_version=", 1) in found  # the one never reported


def test_the_node_list_offers_the_overviews_filters(admin_client, fleet):
    page = admin_client.get(reverse("admin:nodes_node_changelist"))
    for value, label in overview.NodeState.choices:
        assert f"?state={value}" in page.text, value
        assert label in page.text
    versions = re.findall(r'href="\?installed_version=([^"]*)"', page.text)
    assert versions == ["2.10.0", "2.2.0", "2.1.0", "2.0.1", "2.0.0", ""]  # in their order; none reported last
    assert "none reported" in page.text


def test_the_model_list_stays_on_the_home_page(admin_client, fleet):
    page = admin_client.get(INDEX)
    for model, model_admin in admin.site._registry.items():
        if model_admin.has_view_or_change_permission(page.wsgi_request):
            info = (model._meta.app_label, model._meta.model_name)
            assert reverse("admin:{}_{}_changelist".format(*info)) in page.text, model


def test_a_user_who_may_not_see_nodes_gets_the_model_list_without_the_overview(client, staff, fleet):
    user = staff("viewer")
    user.user_permissions.remove(*user.user_permissions.filter(codename="view_node"))
    client.force_login(user)
    page = client.get(INDEX)
    assert page.status_code == 200
    assert page.context["overview"] is None
    assert 'id="fleet-overview"' not in page.text
    assert reverse("admin:updates_updaterun_changelist") in page.text


def test_an_anonymous_visitor_is_sent_to_log_in(client, fleet):
    page = client.get(INDEX)
    assert page.status_code == 302
    assert page.url.startswith(reverse("admin:login"))


def bulk_fleet(first: int, count: int, cluster: Cluster, release: Release) -> None:
    """Nodes in every state, with runs, locks and waiting steps: bulk inserts, so a
    thousand cost a second, not minutes."""
    now = timezone.now()
    versions = ["2.2.0", "2.1.0", "2.0.0", ""]
    nodes = Node.objects.bulk_create(
        Node(hostname=f"n{i:05d}", cluster=cluster if i % 3 == 0 else None, installed_version=versions[i % 4],
             channel="oldstable" if i % 4 == 2 else "stable", maintenance_mode=i % 5 == 0,
             download_warning=i % 7 == 0, last_seen=None if i % 4 == 3 else now - timedelta(seconds=10 * (i % 20)))
        for i in range(first, first + count)
    )  # fmt: skip
    UpdateLock.objects.bulk_create(UpdateLock(node=n, reason="failed") for n in nodes[::10])
    runs = UpdateRun.objects.bulk_create(
        UpdateRun(node=n, release=release, state="running" if k == 0 and i % 6 == 0 else "succeeded")
        for k in range(2) for i, n in enumerate(nodes)
    )  # fmt: skip
    UpdateStep.objects.bulk_create(
        UpdateStep(run=r, name="slot", position=0, state="running") for r in runs if r.state == "running"
    )


def test_the_page_costs_the_same_queries_for_a_thousand_nodes_as_for_ten(admin_client, broker, heartbeats):
    release = Release.objects.create(version="2.2.0", channel="stable")
    Release.objects.create(version="2.0.1", channel="oldstable")
    cluster = Cluster.objects.create(name="big", max_parallel_updates=3)
    UpdateSchedule.objects.create(name="nightly", cluster=cluster, cron="0 3 * * *")
    bulk_fleet(0, 10, cluster, release)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            page = admin_client.get(INDEX)
        assert page.status_code == 200 and page.context["overview"].nodes.count == Node.objects.count()
        return len(captured)

    few = queries()
    bulk_fleet(10, 990, cluster, release)
    many = queries()
    print(f"overview: {few} queries at 10 nodes, {many} at 1,000")
    assert many == few
