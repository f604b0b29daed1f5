"""4. Admin at scale: 10,000 nodes and 200,000 runs on SQLite.

Five pages as a superuser through Django's test Client (server time, no browser):
the fleet overview (the admin's home page: its counts, the clusters' slot use from
a Redis of its own, the next updates of 10 cluster schedules and, on the large fleet,
2,000 single systems' schedules, the last day's runs),
the node list, a node page, the run list, and the confirmation of an Auto-Update of
200 selected nodes (every user of each node is listed there). For each: SQL queries per request and
the median of a few requests' time. The same pages on a 10-node fleet (200 runs)
first: a query count that differs between the two grows with the data.

Targets: the same number of queries on both fleets, and under 250 ms per page.
For every page the slowest query is reported with its EXPLAIN QUERY PLAN, so a
miss names its cause (Django logs query times in whole milliseconds: "0 ms" means
under 1 ms). Last, the run list again with the suggested fixes applied to this
benchmark's own admin instance and database (reported, no target).
Steps exist only for the runs of the first 50 nodes: no page measured here lists
steps of runs it does not show.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from statistics import median
from typing import Any

from bench.common import metric, redis_server, setup_django

OPTIONS = {"nodes"}
RUNS_PER_NODE = 20
REQUESTS = 5
TARGET_MS = 250.0
SCHEDULES = 2_000  # single systems' schedules on the large fleet (10 clusters' on both)
SELECTED = 200  # nodes selected for an Auto-Update (a large cluster); all of them on the 10-node fleet
STEPS = ["notify", "download", "drain", "install", "reboot", "verify", "resume"]


def run(nodes: int = 10_000) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tgp-bench-admin-"))
    os.environ["DJANGO_ALLOWED_HOSTS"] = "testserver,127.0.0.1,localhost"
    try:
        with redis_server(work):
            setup_django(work / "var")
            return measure(nodes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def releases() -> list[Any]:
    from updates.models import Release

    return [
        Release.objects.create(version=v, channel=c)
        for v, c in (("2.0.0", "oldstable"), ("2.1.0", "stable"), ("2.2.0", "stable"))
    ]


def add_fleet(first: int, count: int, rels: list[Any]) -> None:
    """Nodes first..first+count-1, 20 finished runs each, spread over about two years."""
    from django.utils import timezone

    from agent.shared import signing
    from nodes.models import Cluster, Node, NodeKey
    from updates.models import UpdateLock, UpdateRun

    clusters = list(Cluster.objects.all()) or Cluster.objects.bulk_create(Cluster(name=f"c{i}") for i in range(50))
    nodes = Node.objects.bulk_create(
        (
            Node(hostname=f"n{i:05d}", cluster=clusters[i % 50] if i % 3 == 0 else None, installed_version="2.1.0",
                 logged_in_users=["alice", "bob"], last_seen=timezone.now())
            for i in range(first, first + count)
        ),
        batch_size=2000,
    )  # fmt: skip
    UpdateLock.objects.bulk_create(UpdateLock(node=n, reason="earlier failure") for n in nodes[::100])
    # Every node enrolled, as in a real fleet (its key accepted): one key stands for all here.
    public = signing.public_b64(signing.Ed25519PrivateKey.generate())
    NodeKey.objects.bulk_create(
        (NodeKey(node=n, public_key=public, fingerprint=signing.fingerprint(public), state="accepted") for n in nodes),
        batch_size=2000,
    )
    created_at = UpdateRun._meta.get_field("created_at")
    created_at.auto_now_add = False  # type: ignore[attr-defined]  # spread the runs over time
    try:
        now = timezone.now()
        runs = (
            UpdateRun(node=n, release=rels[k % 3], state="failed" if k % 10 == 0 else "succeeded",
                      created_at=now - timedelta(hours=(k * count + i) * 8760 * 2 / (count * RUNS_PER_NODE)),
                      finished_at=now, message="bench")
            for k in range(RUNS_PER_NODE) for i, n in enumerate(nodes)
        )  # fmt: skip
        UpdateRun.objects.bulk_create(runs, batch_size=2000)
    finally:
        created_at.auto_now_add = True  # type: ignore[attr-defined]


def add_schedules(count: int = 10) -> None:
    """Nightly updates of the first clusters, for the overview's next updates."""
    from nodes.models import Cluster
    from updates.models import UpdateSchedule

    for cluster in Cluster.objects.order_by("name")[:count]:
        UpdateSchedule.objects.create(name=f"{cluster} nightly", cluster=cluster, cron=f"0 {cluster.pk % 6} * * *")


def add_node_schedules(count: int) -> None:
    """A weekly window for `count` single systems: a large fleet has thousands of
    schedules, and the overview names the next updates across all of them."""
    from nodes.models import Node
    from updates.models import UpdateSchedule

    for node in Node.objects.filter(cluster=None).order_by("pk")[:count]:
        UpdateSchedule.objects.create(name=f"{node} weekly", node=node, cron=f"{node.pk % 60} {node.pk % 24} * * 0")


def add_steps(node_ids: list[int]) -> None:
    from updates.models import UpdateRun, UpdateStep

    run_ids = UpdateRun.objects.filter(node_id__in=node_ids).values_list("pk", flat=True)
    UpdateStep.objects.bulk_create(
        (UpdateStep(run_id=r, name=s, position=p, state="succeeded") for r in run_ids for p, s in enumerate(STEPS)),
        batch_size=2000,
    )


def client() -> Any:
    from django.contrib.auth.models import User
    from django.test import Client

    user = User.objects.filter(is_superuser=True).first() or User.objects.create_superuser("bench", password="x" * 12)
    c = Client()
    c.force_login(user)
    return c


def page(c: Any, url: str) -> dict[str, Any]:
    """Queries and median server time of REQUESTS requests; the slowest query of the last one."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    c.get(url)  # warm: template and URL caches, SQLite page cache
    times, counts = [], []
    for _ in range(REQUESTS):
        with CaptureQueriesContext(connection) as ctx:
            started = time.perf_counter()
            resp = c.get(url)
            times.append((time.perf_counter() - started) * 1000)
        if resp.status_code != 200:
            raise RuntimeError(f"GET {url} answered {resp.status_code}")
        counts.append(len(ctx.captured_queries))
    slowest = max(ctx.captured_queries, key=lambda q: float(q["time"]))
    return {
        "url": url,
        "queries": max(counts),
        "median_ms": median(times),
        "slowest_query_ms": float(slowest["time"]) * 1000,
        "slowest_query": slowest["sql"][:600],
        "plan": explain(slowest["sql"]),
    }


def explain(sql: str) -> list[str]:
    from django.db import connection

    if connection.vendor != "sqlite" or not sql.lstrip().upper().startswith("SELECT"):
        return []
    with connection.cursor() as cur:
        try:
            cur.execute(f"EXPLAIN QUERY PLAN {sql}")
        except Exception as exc:  # the logged SQL is not always re-runnable (quoting of some params)
            return [f"(no plan: {exc})"]
        return [row[-1] for row in cur.fetchall()]


def pages(c: Any) -> dict[str, dict[str, Any]]:
    from django.urls import reverse

    from nodes.models import Node

    node = Node.objects.filter(locks__isnull=False).order_by("pk").first() or Node.objects.order_by("pk").first()
    assert node is not None
    selected = ",".join(str(pk) for pk in Node.objects.order_by("pk").values_list("pk", flat=True)[:SELECTED])
    return {
        "overview": page(c, reverse("admin:index")),
        "node list": page(c, "/admin/nodes/node/"),
        "node page": page(c, f"/admin/nodes/node/{node.pk}/change/"),
        "run list": page(c, "/admin/updates/updaterun/"),
        "Auto-Update confirmation": page(c, f"{reverse('admin:nodes_node_autoupdate')}?ids={selected}"),
    }


def measure(nodes: int) -> dict[str, Any]:
    from nodes.models import Node

    rels = releases()
    add_fleet(0, 10, rels)
    add_schedules()
    c = client()
    small = pages(c)
    started = time.monotonic()
    add_fleet(10, nodes - 10, rels)
    add_steps(list(Node.objects.order_by("pk").values_list("pk", flat=True)[:50]))
    add_node_schedules(SCHEDULES)
    load_s = time.monotonic() - started
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("ANALYZE")  # what a production database has: statistics for the planner
    large = pages(c)
    return report(small, large, nodes, load_s)


def report(small: dict[str, Any], large: dict[str, Any], nodes: int, load_s: float) -> dict[str, Any]:
    metrics = []
    for name, big in large.items():
        few = small[name]["queries"]
        metrics.append(metric(f"{name}: queries (10 nodes: {few})", big["queries"], "", f"= {few}",
                              big["queries"] <= few))  # fmt: skip
        metrics.append(metric(f"{name}: median time", big["median_ms"], "ms", f"< {TARGET_MS:g}",
                              big["median_ms"] < TARGET_MS))  # fmt: skip
        metrics.append(metric(f"{name}: slowest query", big["slowest_query_ms"], "ms"))
    return {
        "name": "admin",
        "metrics": metrics,
        "details": {
            "nodes": nodes,
            "runs": nodes * RUNS_PER_NODE,
            "load_s": round(load_s, 1),
            "small": small,
            "large": large,
        },
    }
