"""/metrics: every metric against a fleet built here, the control queue and the slots
from a real Redis, who gets in (token, basic auth, permission), and a scrape whose
query count does not grow with the fleet."""

from __future__ import annotations

import base64
import logging
import socket
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from agent.shared.protocol import CONTROL_QUEUE, HEARTBEATS, OUT_PREFIX, SLOT_PREFIX
from nodes.models import Cluster, Node
from tests.servers import free_port
from tgpadmin.broker_acl import queue_keys
from tgpadmin.env import env_secret
from updates.models import Release, UpdateLock, UpdateRun, UpdateStep
from updates.slots import ClusterSlots

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(120)]

TOKEN = "metrics-token-for-tests-" + "k" * 20
PASSWORD = "pw-for-tests-only"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


# --- scraping -------------------------------------------------------------------------


def scrape(client: Any, **headers: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape with the token, by (sample name, labels)."""
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}", **headers})
    assert response.status_code == 200, response.content
    families = text_string_to_metric_families(response.content.decode())
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def bucket(samples: dict, name: str, le: float | str, **labels: str) -> float:
    le = le if isinstance(le, str) else f"{float(le)}"
    return value(samples, f"{name}_bucket", le=le, **labels)


# --- the fleet ------------------------------------------------------------------------


@pytest.fixture
def broker(settings: Any, redis_url: str):
    """A Redis database of this file's own on the session's server, as the web's broker."""
    base, db = redis_url.rsplit("/", 1)
    url = f"{base}/{14 if db == '15' else 15}"
    settings.REDIS_URL = url
    client = redis.Redis.from_url(url)
    client.delete(*queue_keys(CONTROL_QUEUE, literal=False))
    yield client
    client.delete(*queue_keys(CONTROL_QUEUE, literal=False))
    for prefix in (SLOT_PREFIX, OUT_PREFIX):
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)


@pytest.fixture
def scraping(settings: Any, broker: redis.Redis) -> redis.Redis:
    settings.TGP_METRICS_TOKEN = TOKEN
    settings.TGP_HEARTBEAT_INTERVAL = 15.0
    settings.TGP_SEEN_RESOLUTION = 30.0  # silent: not seen for 3 x 15 + 30 = 75 s
    return broker


def add_node(*, seen: float | None, version: str = "2.2.0", channel: str = "stable", **fields: Any) -> Node:
    """A node last seen `seen` seconds ago (None: never reported)."""
    last_seen = None if seen is None else timezone.now() - timedelta(seconds=seen)
    return Node.objects.create(
        hostname=unique("gw"), installed_version=version, channel=channel, last_seen=last_seen, **fields
    )


def add_run(node: Node, trigger: str, state: str, **fields: Any) -> UpdateRun:
    release = Release.objects.get(version="2.2.0")
    return UpdateRun.objects.create(node=node, release=release, trigger=trigger, state=state, **fields)


def add_step(run: UpdateRun, name: str, state: str, seconds: float | None, ended_ago: timedelta) -> UpdateStep:
    """A step that took `seconds` and ended `ended_ago` (seconds None: still running)."""
    finished = timezone.now() - ended_ago
    started = finished - timedelta(seconds=seconds or 0)
    return UpdateStep.objects.create(
        run=run, name=name, state=state, position=run.steps.count(),
        started_at=started, finished_at=None if seconds is None else finished,
    )  # fmt: skip


@pytest.fixture
def fleet(scraping: redis.Redis) -> dict[str, Any]:
    for version, channel in [("2.0.1", "oldstable"), ("2.1.0", "stable"), ("2.2.0", "stable")]:
        Release.objects.create(version=version, channel=channel)
    cluster = Cluster.objects.create(name=unique("c"), max_parallel_updates=2, max_out_of_lb=3)
    idle = Cluster.objects.create(name=unique("idle"))  # cap 1, out of the load balancer 2, nobody holds any
    nodes = {
        "never": add_node(seen=None, version=""),
        "fresh": add_node(seen=0),
        "late": add_node(seen=60),  # past 3 heartbeats, not past the resolution on top
        "silent": add_node(seen=600, version="2.1.0", download_warning=True),
        "updating": add_node(seen=5, version="2.1.0", cluster=cluster),
        "old": add_node(seen=2 * 86400, version="2.0.1", channel="oldstable", cluster=cluster),
    }
    add_run(nodes["updating"], "manual", "running")
    good = add_run(nodes["fresh"], "manual", "succeeded")
    add_run(nodes["fresh"], "scheduled", "succeeded")
    bad = add_run(nodes["silent"], "scheduled", "failed")
    add_run(nodes["silent"], "download", "failed")
    catchup = add_run(nodes["old"], "catchup_full", "failed")
    add_run(nodes["late"], "scheduled", "cancelled")

    add_step(good, "notify", "skipped", 0, timedelta(hours=1))  # skipped: no duration
    add_step(good, "download", "succeeded", 40, timedelta(hours=1))
    add_step(good, "install", "succeeded", 200, timedelta(hours=1))
    add_step(bad, "install", "failed", 2000, timedelta(hours=2))
    add_step(catchup, "install", "succeeded", 10, timedelta(days=2))  # outside the window
    add_step(UpdateRun.objects.get(state="running"), "download", "running", None, timedelta(0))

    UpdateLock.objects.create(node=nodes["old"], reason="catch-up failed", run=catchup)
    UpdateLock.objects.create(node=nodes["silent"], reason="history", removed_at=timezone.now())

    slots, places = ClusterSlots(scraping), ClusterSlots(scraping, OUT_PREFIX)
    assert slots.acquire(cluster.name, nodes["updating"].hostname, 2) is not None
    for node in ("updating", "old"):
        assert places.acquire(cluster.name, nodes[node].hostname, 3) is not None

    scraping.lpush(CONTROL_QUEUE, *["m1", "m2", "m3"])
    scraping.lpush(queue_keys(CONTROL_QUEUE, literal=False)[1], *["p1", "p2"])  # a priority list of the queue
    return {"cluster": cluster, "idle": idle, "redis": scraping, **nodes}


# --- the metrics --------------------------------------------------------------------------


def test_nodes_by_state_version_and_channel(client, fleet):
    samples = scrape(client)
    nodes = {labels: v for (name, labels), v in samples.items() if name == "tgpadmin_nodes"}
    expected = {
        ("never_reported", "", "stable"): 1,
        ("updating", "2.1.0", "stable"): 1,
        ("online", "2.2.0", "stable"): 2,
        ("online", "2.1.0", "stable"): 1,
        ("online", "2.0.1", "oldstable"): 1,
    }
    as_labels = {frozenset({"state": s, "version": v, "channel": c}.items()): n for (s, v, c), n in expected.items()}
    assert nodes == as_labels
    # The admin's own word on each node's state, for the same fleet.
    for node in Node.objects.with_status():
        assert value(samples, "tgpadmin_nodes", state=node.status, version=node.installed_version, channel=node.channel)


def test_update_locks_and_download_warnings(client, fleet):
    samples = scrape(client)
    assert value(samples, "tgpadmin_update_locks") == 1  # the removed one is history
    assert value(samples, "tgpadmin_download_warnings") == 1


def test_runs_started_succeeded_and_failed_by_trigger(client, fleet):
    samples = scrape(client)
    expected = {
        "started": {"manual": 2, "scheduled": 3, "download": 1, "catchup_full": 1, "catchup_partial": 0},
        "succeeded": {"manual": 1, "scheduled": 1, "download": 0, "catchup_full": 0, "catchup_partial": 0},
        "failed": {"manual": 0, "scheduled": 1, "download": 1, "catchup_full": 1, "catchup_partial": 0},
        "cancelled": {"manual": 0, "scheduled": 1, "download": 0, "catchup_full": 0, "catchup_partial": 0},
    }
    for what, by_trigger in expected.items():
        for trigger, n in by_trigger.items():
            assert value(samples, f"tgpadmin_update_runs_{what}_total", trigger=trigger) == n, (what, trigger)
    assert value(samples, "tgpadmin_update_runs_running", trigger="manual") == 1
    assert value(samples, "tgpadmin_update_runs_running", trigger="scheduled") == 0


def test_runs_are_counted_from_the_database_so_a_new_process_counts_the_same(client, fleet):
    from updates import metrics

    before = scrape(client)
    metrics.registry.cache_clear()  # as a restarted web process, or another one, would start
    assert scrape(client) == pytest.approx(before, abs=10)  # the heartbeat ages have grown a little
    add_run(fleet["fresh"], "manual", "failed")
    after = scrape(client)
    assert value(after, "tgpadmin_update_runs_failed_total", trigger="manual") == 1
    assert value(after, "tgpadmin_update_runs_started_total", trigger="manual") == 3


def test_step_durations_of_the_last_day_as_a_histogram(client, fleet):
    samples = scrape(client)
    name = "tgpadmin_update_step_duration_seconds"
    install = {le: bucket(samples, name, le, step="install") for le in (120, 300, 1800, 3600, "+Inf")}
    assert install == {120: 0, 300: 1, 1800: 1, 3600: 2, "+Inf": 2}  # 200 s and 2000 s; the 2-day-old one is out
    assert value(samples, f"{name}_gsum", step="install") == pytest.approx(2200)
    assert value(samples, f"{name}_gcount", step="install") == 2
    assert bucket(samples, name, 30, step="download") == 0
    assert bucket(samples, name, 60, step="download") == 1  # 40 s; the running one has no duration yet
    assert value(samples, f"{name}_gsum", step="download") == pytest.approx(40)
    assert bucket(samples, name, "+Inf", step="notify") == 0  # skipped
    assert bucket(samples, name, "+Inf", step="reboot") == 0  # every step has its series


def test_update_slots_and_places_per_cluster_from_redis(client, fleet):
    samples = scrape(client)
    cluster, idle = fleet["cluster"].name, fleet["idle"].name
    assert value(samples, "tgpadmin_cluster_update_slots", cluster=cluster) == 2
    assert value(samples, "tgpadmin_cluster_update_slots_in_use", cluster=cluster) == 1
    assert value(samples, "tgpadmin_cluster_out_of_lb_places", cluster=cluster) == 3
    assert value(samples, "tgpadmin_cluster_out_of_lb_places_in_use", cluster=cluster) == 2
    assert value(samples, "tgpadmin_cluster_update_slots", cluster=idle) == 1
    assert value(samples, "tgpadmin_cluster_out_of_lb_places", cluster=idle) == 2
    assert value(samples, "tgpadmin_cluster_update_slots_in_use", cluster=idle) == 0


def test_heartbeat_age_and_silent_nodes(client, fleet):
    samples = scrape(client)
    name = "tgpadmin_node_heartbeat_age_seconds"
    # Ages 0, 5, 60, 600 and two days; buckets at 1, 2, 3, 5, 10, 20, 60 and 240 intervals of 15 s.
    expected = {15: 2, 30: 2, 45: 2, 75: 3, 150: 3, 300: 3, 900: 4, 3600: 4, "+Inf": 5}
    assert {le: bucket(samples, name, le) for le in expected} == expected
    assert value(samples, f"{name}_gsum") == pytest.approx(5 + 60 + 600 + 2 * 86400, abs=10)
    assert value(samples, "tgpadmin_nodes_silent") == 2  # 600 s and two days; 60 s is within 3 x 15 + 30
    assert value(samples, "tgpadmin_heartbeat_interval_seconds") == 15


def test_control_queue_length_from_real_redis(client, fleet):
    samples = scrape(client)
    assert value(samples, "tgpadmin_broker_up") == 1
    assert value(samples, "tgpadmin_control_queue_messages") == 5  # 3 + 2 on a priority list
    fleet["redis"].rpop(CONTROL_QUEUE)  # a worker takes one
    assert value(scrape(client), "tgpadmin_control_queue_messages") == 4


def test_heartbeats_waiting_from_real_redis(client, fleet):
    assert value(scrape(client), "tgpadmin_heartbeats_waiting") == 0
    fleet["redis"].rpush(HEARTBEATS, b"one", b"two")  # no manage.py heartbeats takes them
    try:
        assert value(scrape(client), "tgpadmin_heartbeats_waiting") == 2
    finally:
        fleet["redis"].delete(HEARTBEATS)


def test_a_broker_that_does_not_answer_is_broker_up_0_not_a_failed_scrape(client, fleet, settings, caplog):
    settings.REDIS_URL = f"redis://:secret-broker-password@127.0.0.1:{free_port()}/0"
    samples = scrape(client)
    assert value(samples, "tgpadmin_broker_up") == 0
    assert not any(name == "tgpadmin_control_queue_messages" for name, _ in samples)
    assert not any(name == "tgpadmin_cluster_update_slots_in_use" for name, _ in samples)
    assert value(samples, "tgpadmin_cluster_update_slots", cluster=fleet["cluster"].name) == 2  # from the database
    assert value(samples, "tgpadmin_update_locks") == 1
    assert "secret-broker-password" not in caplog.text


def test_a_broker_that_hangs_costs_the_scrape_seconds_not_its_timeout(client, fleet, settings):
    from updates import metrics

    with socket.create_server(("127.0.0.1", 0)) as silent:  # takes connections, never answers
        settings.REDIS_URL = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        began = time.monotonic()
        samples = scrape(client)
    assert value(samples, "tgpadmin_broker_up") == 0
    assert time.monotonic() - began < 3 * metrics.REDIS_TIMEOUT


def test_only_the_fleets_metrics_not_the_processs(client, fleet):
    names = {name for name, _ in scrape(client)}
    assert names and all(name.startswith("tgpadmin_") for name in names), names


def test_openmetrics_when_prometheus_asks_for_it(client, fleet):
    response = client.get(
        "/metrics", headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/openmetrics-text"}
    )
    assert response["Content-Type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(response.content.decode())}
    assert families["tgpadmin_update_step_duration_seconds"].type == "gaugehistogram"
    assert families["tgpadmin_update_runs_started"].type == "counter"


# --- who gets in ----------------------------------------------------------------------------


@pytest.fixture
def users(db: Any) -> dict[str, Any]:
    from django.contrib.auth.models import Permission, User

    scraper = User.objects.create_user("prometheus", password=PASSWORD)
    scraper.user_permissions.add(Permission.objects.get(codename="scrape_metrics"))
    viewer = User.objects.create_user("viewer", password=PASSWORD, is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(codename__startswith="view_"))
    return {"scraper": scraper, "viewer": viewer}


def basic(username: str, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def get(client: Any, **headers: str) -> Any:
    return client.get("/metrics", headers=headers)


def test_refused_without_credentials_even_without_a_token_configured(client, scraping, settings):
    response = get(client)
    assert response.status_code == 401
    assert "Bearer" in response["WWW-Authenticate"] and "Basic" in response["WWW-Authenticate"]
    settings.TGP_METRICS_TOKEN = ""
    assert get(client).status_code == 401
    assert get(client, Authorization="Bearer ").status_code == 401
    assert get(client, Authorization="Bearer anything").status_code == 401


def test_the_token(client, scraping):
    assert get(client, Authorization=f"Bearer {TOKEN}").status_code == 200
    assert get(client, Authorization=f"bearer {TOKEN}").status_code == 200
    assert get(client, Authorization=f"Bearer {TOKEN[:-1]}").status_code == 401
    assert get(client, Authorization=f"Bearer {TOKEN}x").status_code == 401
    assert get(client, Authorization=f"Bearer {TOKEN.upper()}").status_code == 401
    assert get(client, Authorization=TOKEN).status_code == 401  # no scheme


def test_basic_auth_of_a_user_with_the_permission(client, scraping, users):
    assert get(client, **basic("prometheus")).status_code == 200
    assert get(client, **basic("prometheus", "wrong")).status_code == 401
    assert get(client, **basic("nobody")).status_code == 401
    assert get(client, Authorization="Basic not-base64!").status_code == 401
    assert get(client, **basic("viewer")).status_code == 403  # right password, no permission
    users["scraper"].is_active = False
    users["scraper"].save()
    assert get(client, **basic("prometheus")).status_code == 401


def test_a_logged_in_user_needs_the_permission(client, scraping, users):
    client.force_login(users["viewer"])
    response = get(client)
    assert response.status_code == 403
    assert "nodes.scrape_metrics" in response.content.decode()
    assert get(client, Authorization="Bearer wrong").status_code == 401  # a wrong token is wrong, session or not
    client.force_login(users["scraper"])
    assert get(client).status_code == 200


def test_only_reads(client, scraping):
    assert client.post("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 405


def test_the_token_is_never_logged(client, scraping, caplog):
    caplog.set_level(logging.DEBUG)
    get(client, Authorization=f"Bearer {TOKEN}")
    get(client, Authorization=f"Bearer {TOKEN}-guess")
    assert TOKEN not in caplog.text


# --- cost -----------------------------------------------------------------------------------


def grow_fleet(n: int, cluster: Cluster) -> None:
    """n more nodes in every state, each with runs, steps, locks and warnings."""
    release = Release.objects.get(version="2.2.0")
    now = timezone.now()
    nodes = Node.objects.bulk_create(
        Node(
            hostname=unique("n"), installed_version="2.2.0" if i % 3 else "2.1.0", cluster=cluster if i % 2 else None,
            last_seen=None if i % 7 == 0 else now - timedelta(seconds=i * 10), download_warning=i % 5 == 0,
        )
        for i in range(n)
    )  # fmt: skip
    runs = UpdateRun.objects.bulk_create(
        UpdateRun(node=node, release=release, trigger="manual", state="running" if i % 4 == 0 else "succeeded")
        for i, node in enumerate(nodes)
    )
    UpdateStep.objects.bulk_create(
        UpdateStep(run=run, name="install", position=0, state="succeeded", started_at=now - timedelta(seconds=60),
                   finished_at=now)
        for run in runs
    )  # fmt: skip
    UpdateLock.objects.bulk_create(UpdateLock(node=node, reason="test") for node in nodes[::6])


def test_a_scrape_costs_the_same_queries_for_10_and_200_nodes(client, scraping):
    Release.objects.create(version="2.2.0", channel="stable")
    cluster = Cluster.objects.create(name=unique("c"), max_parallel_updates=3)
    counts = []
    for n in (10, 190):
        grow_fleet(n, cluster)
        with CaptureQueriesContext(connection) as queries:
            samples = scrape(client)
        counts.append(len(queries))
    assert counts[0] == counts[1], counts
    assert counts[0] <= 12, [q["sql"] for q in queries.captured_queries]
    assert sum(v for (name, _), v in samples.items() if name == "tgpadmin_nodes") == 200


# --- configuration --------------------------------------------------------------------------


def test_a_warning_when_no_token_is_configured(settings):
    settings.TGP_METRICS_TOKEN = ""
    assert "tgpadmin.W004" in {m.id for m in run_checks()}
    settings.TGP_METRICS_TOKEN = TOKEN
    assert "tgpadmin.W004" not in {m.id for m in run_checks()}


def test_the_token_from_the_environment_or_a_file(monkeypatch, tmp_path):
    monkeypatch.delenv("TGP_T", raising=False)
    monkeypatch.delenv("TGP_T_FILE", raising=False)
    assert env_secret("TGP_T", min_length=16) == ""
    monkeypatch.setenv("TGP_T", TOKEN)
    assert env_secret("TGP_T", min_length=16) == TOKEN
    monkeypatch.delenv("TGP_T")
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    monkeypatch.setenv("TGP_T_FILE", str(path))
    assert env_secret("TGP_T", min_length=16) == TOKEN


@pytest.mark.parametrize(
    ("env", "file_text", "mode", "message"),
    [
        ({"TGP_T": TOKEN}, TOKEN, 0o600, "both set"),
        ({}, TOKEN, 0o644, "open to other users"),
        ({}, "\n", 0o600, "is empty"),
        ({}, None, 0o600, "cannot be read"),
        ({}, "short-secret", 0o600, "at least 16 characters"),
        ({}, "a token with spaces in it", 0o600, "at least 16 characters"),
    ],
)
def test_a_bad_token_setting_fails_loudly_without_showing_the_secret(
    monkeypatch, tmp_path, env, file_text, mode, message
):
    path = tmp_path / "token"
    if file_text is not None:
        path.write_text(file_text)
        path.chmod(mode)
    monkeypatch.setenv("TGP_T_FILE", str(path))
    for name, text in env.items():
        monkeypatch.setenv(name, text)
    with pytest.raises(ImproperlyConfigured, match=message) as refused:
        env_secret("TGP_T", min_length=16)
    assert "TGP_T" in str(refused.value)
    for secret in {TOKEN, (file_text or "").strip()} - {""}:
        assert secret not in str(refused.value)
