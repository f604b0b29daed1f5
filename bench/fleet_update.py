"""6b. A fleet-wide time-controlled update due at one instant (issue 16).

The fleet of bench 6 (bench/fleet.py's seed: four fifths of the nodes in clusters
of 4, the rest single systems; 2,500 nodes: 500 clusters, 500 single systems) in
PostgreSQL, with the control side unchanged: a real `celery beat` (DatabaseScheduler,
--max-interval 1, as bench/beat_lag.py) and one control worker as the Procfile
starts it (-c 2 -E -l INFO, bench/fleet.py's). The nodes are simulated by
multi-node Celery workers (bench/multinode.py: a worker per 250 nodes, a thread per
node, the real agent step tasks with the TimedDriver; no heartbeats, no reboots: a
release that needs none). Every node signs its reports with the key the seed had
accepted for it.

One one-off UpdateSchedule per cluster and per single system, all with the same
update time (run_at, a whole minute) and the same download lead: every download
entry fires at one instant, every single system's update entry at run_at and every
cluster's update entry the load-balancer lead before it. Downloads are of a signed
repository on loopback HTTP (packages of 1 KB); the download instant leaves them
DOWNLOAD_PER_NODE s a node before the clusters' update entries (the report says when
the last one ended). Clusters: cap 2 (two waves of two), the default bound out of the load
balancer (4: the whole cluster), expected update EXPECTED, the lead lead_for() the
number of clusters; installs draw LOW-HIGH s. Why these:

- the lead: a cluster's update entry fires the lead before the update time; in it
  the control plane fires every cluster's entry and takes each first-wave node out
  of the load balancer (leave, exclude) to hold until its time, so that at the update
  time only the logging off is left, as in production with its hour. Measured on 2
  busy cores: 80 clusters' first waves all out 10 s after their entries fired (0.125 s
  a cluster, the second waves leaving meanwhile); the lead allows 0.15 s a cluster, at
  least 60 s (500 clusters: 90 s). The report says how long before the update time the
  last first-wave node was out (a target: before it). The manual's hour, or a few
  minutes, would only make the benchmark wait.
- EXPECTED 30 s: above the longest install (15 s) plus a node's hand-offs, so that
  a plan holds when the control plane keeps up; the lead at least 2 x EXPECTED, as
  the defaults (1 h lead, 30 min updates): the second wave leaves the load balancer
  before the update time, as in production. With the cap at 2 the bound out of the
  load balancer is the whole cluster, so the lead moves no node's time.

Measured, from the update time (run_at):
- every first wave disconnected: for each cluster the nodes its plan gives the
  earliest time, and every single system; the node's own time of `drain` (its users
  logged off: TimedDriver's events). Target: the last within FIRST_WAVE_TARGET s;
- the whole fleet done (the last run finished) against the plan's ideal: each
  cluster node at its planned time plus its drawn install, each single system at
  run_at plus its install (no overhead), and against the latest planned end of the
  plans (planned time plus expected duration);
- the admin's node list, a first-wave node's page and its cluster's page, timed with
  Django's test Client as superuser from this process every PAGE_EVERY s while the
  update runs (from the clusters' update entries to the fleet done); at rest before,
  as a baseline. Target: median under PAGE_TARGET_MS.
Each look also notes the control queue's length (and every fifth, what waits in it by
task name) and the machine's load: it is shared, and others' work shows there.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from statistics import median
from typing import Any

from bench import fleet
from bench.common import metric, percentile, spawn, stop_process

OPTIONS = {"nodes"}
CAP = 2  # of a cluster of 4: two waves
LEAD_MIN, LEAD_PER_CLUSTER = 60.0, 0.15  # seconds (lead_for)
EXPECTED = timedelta(seconds=30)
LOW, HIGH = 5.0, 15.0  # install durations, uniform (bench 1's --scale 5)
SEED = 16
FIRST_WAVE_TARGET = 60.0
PAGE_TARGET_MS = 250.0
PAGE_EVERY = 2.0
REST_REQUESTS = 5
NODES_PER_WORKER = 250
# From the download instant to the clusters' update entries: the firings and every
# node's notify and download. Measured here: 200 nodes in 17 s, 400 in 27 s on 2 busy shared cores.
DOWNLOAD_BASE, DOWNLOAD_PER_NODE = 20.0, 0.07
SAVE_PER_SCHEDULE, BEAT_START = 0.04, 15.0  # seconds: what must fit before the download instant
# No run ended for this long after the plan's end: the rest are stuck. (120 s gave up on
# a 1,000-node fleet whose control queue still moved: verify ran, complete waited behind
# 3,000 messages.)
STALL = 300.0


def run(nodes: int = 2500) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tgp-bench-fleetup-"))
    db = f"tgp_bench_fleetup_{os.getpid()}"
    os.environ["DJANGO_ALLOWED_HOSTS"] = "testserver,127.0.0.1,localhost"  # the test Client's host
    try:
        with ExitStack() as stack:
            redis_url = stack.enter_context(fleet.redis_server(work, also=None))
            fleet.setup_django(work / "var", db)
            return measure(work, redis_url, db, nodes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        fleet.drop_database(db)


# --- pure helpers (tests/test_bench_fleet_update.py) ----------------------------------------


def durations_for(hostnames: list[str]) -> dict[str, float]:
    rng = random.Random(SEED)
    return {h: rng.uniform(LOW, HIGH) for h in hostnames}


def times_for(now: datetime, ready_in: float, download_s: float, lead: timedelta) -> tuple[datetime, datetime]:
    """(download instant, update time): the download when setup is expected to be
    done (`ready_in` s from now), the update time the first whole minute that leaves
    `download_s` for the downloads before the clusters' update entries fire."""
    download_at = (now + timedelta(seconds=math.ceil(ready_in))).replace(microsecond=0)
    earliest = download_at + timedelta(seconds=download_s) + lead
    run_at = earliest.replace(second=0, microsecond=0)
    return download_at, run_at if run_at >= earliest else run_at + timedelta(minutes=1)


def lead_for(clusters: int) -> timedelta:
    """The clusters' load-balancer lead: LEAD_PER_CLUSTER a cluster, at least LEAD_MIN,
    in whole half minutes."""
    return timedelta(seconds=max(LEAD_MIN, math.ceil(LEAD_PER_CLUSTER * clusters / 30) * 30))


def first_waves(entries: Iterable[tuple[int, str, datetime]]) -> set[str]:
    """From (plan, node, planned time): the nodes each plan gives its earliest time."""
    earliest: dict[int, datetime] = {}
    rows = list(entries)
    for plan, _, at in rows:
        earliest[plan] = min(at, earliest.get(plan, at))
    return {node for plan, node, at in rows if at == earliest[plan]}


def ideal_end(starts: dict[str, datetime], durations: dict[str, float]) -> datetime:
    """The plan's ideal: each node logged off at its own time and done after its install, no overhead."""
    return max(at + timedelta(seconds=durations[node]) for node, at in starts.items())


def summary(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v == v]
    if not values:
        return {"n": 0}
    return {
        "n": len(values), "min": round(min(values), 3), "p50": round(percentile(values, 50), 3),
        "p90": round(percentile(values, 90), 3), "max": round(max(values), 3),
    }  # fmt: skip


# --- setup ----------------------------------------------------------------------------------


def prepare_nodes(keys: list[tuple[str, str]], state_dir: Path, durations: dict[str, float], lead: timedelta) -> None:
    """Each seeded node's simulated appliance on the old release, signing with the key
    the seed accepted for it, with its install duration; its row as the appliance
    reports it (the release's packages, cluster nodes in the load balancer)."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    from bench.multinode import OLD, PACKAGES
    from bench.rollout_driver import TimedDriver
    from nodes.demo import publish_control_key
    from nodes.models import Cluster, Node

    clustered = set(Node.objects.filter(cluster__isnull=False).values_list("hostname", flat=True))
    for hostname, raw in keys:
        key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(raw))
        driver = TimedDriver(hostname, state_dir / hostname)
        driver.seed(version=OLD, packages=PACKAGES[OLD], users=["alice"], cluster=hostname in clustered)
        (state_dir / hostname / "identity.key").write_bytes(
            key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        )
        driver.duration_file.write_text(repr(durations[hostname]))
    Node.objects.update(installed_packages=PACKAGES[OLD])
    Node.objects.filter(cluster__isnull=False).update(in_load_balancer=True)
    Cluster.objects.update(max_parallel_updates=CAP, lb_lead_time=lead, expected_update=EXPECTED)
    publish_control_key()


def save_schedules(run_at: datetime, download_lead: timedelta) -> int:
    from nodes.models import Cluster, Node
    from updates.models import UpdateSchedule

    count = 0
    for cluster in Cluster.objects.order_by("pk"):
        UpdateSchedule(name=f"bench {cluster}", cluster=cluster, run_at=run_at, download_lead=download_lead).save()
        count += 1
    for node in Node.objects.filter(cluster=None).order_by("pk"):
        UpdateSchedule(name=f"bench {node}", node=node, run_at=run_at, download_lead=download_lead).save()
        count += 1
    return count


def start_beat(work: Path, env: dict[str, str]) -> Any:
    cmd = [sys.executable, "-m", "celery", "-A", "tgpadmin", "beat", "-l", "INFO", "--max-interval", "1"]
    cmd += ["--pidfile=", "-s", str(work / "beat-schedule")]
    return spawn(cmd, {**env, "TGP_LOG_LEVEL": "INFO"}, work / "beat.log")


# --- the admin's pages ----------------------------------------------------------------------


def admin_client() -> Any:
    from django.contrib.auth.models import User
    from django.test import Client

    user = User.objects.filter(is_superuser=True).first() or User.objects.create_superuser("bench", password="x" * 12)
    client = Client()
    client.force_login(user)
    return client


def timed_get(client: Any, url: str) -> float:
    started = time.perf_counter()
    resp = client.get(url)
    ms = (time.perf_counter() - started) * 1000
    if resp.status_code != 200:
        raise RuntimeError(f"GET {url} answered {resp.status_code}")
    return ms


def page_urls(hostname: str) -> dict[str, str]:
    from nodes.models import Node

    node = Node.objects.get(hostname=hostname)
    return {
        "node list": "/admin/nodes/node/",
        "node page": f"/admin/nodes/node/{node.pk}/change/",
        "cluster page": f"/admin/nodes/cluster/{node.cluster_id}/change/",
    }


# --- the run --------------------------------------------------------------------------------


@dataclass
class Phases:
    """What the run saw, in seconds from the update time (run_at) unless named otherwise."""

    download_at: datetime
    run_at: datetime
    lead: timedelta
    setup_s: float = 0.0
    saves_s: float = 0.0
    schedules: int = 0
    downloads_done: float = math.nan
    downloads_ok: int = 0
    ended_at: float = math.nan
    timed_out: bool = False
    fired: dict[str, Any] | None = None


def wait_until(moment: datetime) -> None:
    from django.utils import timezone

    time.sleep(max((moment - timezone.now()).total_seconds(), 0.0))


def measure(work: Path, redis_url: str, db: str, count: int) -> dict[str, Any]:
    import redis
    from django.utils import timezone

    from agent.shared.protocol import CONTROL_QUEUE
    from bench.multinode import build_noreboot_repo, start_node_workers
    from nodes.models import Cluster, Node
    from tests.servers import RepoServer
    from tgpadmin.broker_acl import queue_keys
    from updates.models import UpdateRun, UpdateStep

    started = time.monotonic()
    print(f"   seeding {count} nodes in PostgreSQL ...", flush=True)
    keys = fleet.seed(count, work)
    hostnames = [h for h, _ in keys]
    durations = durations_for(hostnames)
    lead = lead_for(Cluster.objects.count())
    prepare_nodes(keys, work / "nodes", durations, lead)
    repo_dir, pinned_root = build_noreboot_repo(work / "repo")
    client = admin_client()
    clustered = Node.objects.filter(cluster__isnull=False).order_by("hostname").values_list("hostname", flat=True)
    rest_urls = page_urls(clustered.first() or hostnames[0])  # at rest; during the update a first-wave node's
    rest = {name: [timed_get(client, url) for _ in range(REST_REQUESTS + 1)][1:] for name, url in rest_urls.items()}
    control = fleet.Fleet(work, redis_url, db, [])
    broker = redis.Redis.from_url(redis_url)
    control_keys = queue_keys(CONTROL_QUEUE, literal=False)
    procs: list[Any] = []
    samples: list[dict[str, Any]] = []
    with RepoServer(repo_dir) as server:
        os.environ |= {"TGP_REPO_URL": server.url, "TGP_REPO_ROOT_FILE": pinned_root}  # the control worker's env
        try:
            control.start_control()
            env = {**control.env(), "TGP_NODE_STATE_DIR": str(work / "nodes"), "TGP_LOG_LEVEL": "WARNING"}
            workers = max(1, math.ceil(count / NODES_PER_WORKER))
            print(f"   {workers} node worker(s) ...", flush=True)
            procs += start_node_workers(hostnames, env, work / "nodes.log", workers=workers,
                                        concurrency=math.ceil(count / workers))  # fmt: skip
            schedules_due = Cluster.objects.count() + Node.objects.filter(cluster=None).count()
            ready_in = schedules_due * SAVE_PER_SCHEDULE + BEAT_START
            download_s = DOWNLOAD_BASE + DOWNLOAD_PER_NODE * count
            download_at, run_at = times_for(timezone.now(), ready_in, download_s, lead)
            phases = Phases(download_at, run_at, lead)
            saving = time.monotonic()
            phases.schedules = save_schedules(run_at, run_at - download_at)
            phases.saves_s = time.monotonic() - saving
            procs.append(start_beat(work, control.env()))
            phases.setup_s = time.monotonic() - started
            late = (timezone.now() - download_at).total_seconds()
            print(f"   {phases.schedules} schedules; downloads at {download_at:%H:%M:%S}, update at "
                  f"{run_at:%H:%M:%S} (setup {phases.setup_s:.0f} s, {-late:.0f} s to spare)", flush=True)  # fmt: skip
            if timezone.now() >= run_at - lead:
                raise RuntimeError(f"setup took {phases.setup_s:.0f} s: past the clusters' update entries")
            wait_until(download_at)
            cpu0, cpu_from = sum(map(fleet.cpu_seconds, control.controls)), time.monotonic()
            downloads = UpdateStep.objects.filter(name="download", run__scheduled_for=run_at, state="succeeded")
            while timezone.now() < run_at - lead and downloads.count() < count:
                time.sleep(1)
            phases.downloads_ok = downloads.count()
            if phases.downloads_ok == count:
                last = downloads.order_by("-finished_at").values_list("finished_at", flat=True).first()
                assert last is not None
                phases.downloads_done = (last - run_at).total_seconds()
            print(f"   downloads: {phases.downloads_ok} of {count} by {phases.downloads_done:.1f} s", flush=True)
            plan = read_plan(run_at)
            firsts = first_waves((p, h, at) for h, (p, at, _) in plan.items())
            firsts |= {h for h in hostnames if h not in plan}  # every single system
            urls = page_urls(sorted(h for h in firsts if h in plan)[0] if plan else hostnames[0])
            wait_until(run_at - lead)
            runs = UpdateRun.objects.filter(scheduled_for=run_at)
            drains = UpdateStep.objects.filter(name="drain", run__scheduled_for=run_at, started_at__isnull=False)
            # Generous: at 2,500 nodes the control worker's backlog may take minutes (the report shows it).
            deadline = run_at + timedelta(seconds=300 + 0.2 * count)
            last_ended, last_change = -1, time.monotonic()
            planned_end = max((at + exp for _, at, exp in plan.values()), default=run_at + EXPECTED)
            while True:
                began = time.monotonic()
                now = timezone.now()
                row = {"t": round((now - run_at).total_seconds(), 1)}
                for name, url in urls.items():
                    row[name] = round(timed_get(client, url), 1)
                row["drain_reported"] = drains.count()  # the control plane's record: its queue may lag
                row["ended"] = ended = runs.exclude(state=UpdateRun.State.RUNNING).count()
                # What waits, by task, every fifth look (a backlog of thousands costs this process CPU).
                row["control_queue"] = queued(broker, control_keys, by_task=len(samples) % 5 == 0)
                row["load1"] = round(os.getloadavg()[0], 2)  # the machine is shared: others' work shows here
                samples.append(row)
                if ended >= count:
                    break
                if ended != last_ended:
                    last_ended, last_change = ended, time.monotonic()
                elif now > planned_end and time.monotonic() - last_change > STALL or now > deadline:
                    phases.timed_out = True
                    break
                time.sleep(max(0.0, PAGE_EVERY - (time.monotonic() - began)))
            last_end = runs.order_by("-finished_at").values_list("finished_at", flat=True).first()
            phases.ended_at = (last_end - run_at).total_seconds() if last_end else math.nan
            control_cpu = (sum(map(fleet.cpu_seconds, control.controls)) - cpu0) / (time.monotonic() - cpu_from)
            phases.fired = fired_by(run_at)
        finally:
            for proc in reversed(procs):
                stop_process(proc)
            control.stop()
    rows = collect(run_at, plan, durations, work / "nodes")
    return report(count, phases, rows, firsts, plan, durations, rest, samples, control_cpu, work)


def queued(broker: Any, keys: Iterable[str], by_task: bool) -> dict[str, int]:
    """How many messages wait in the control queue (its lists, one per priority step), and
    with `by_task` the four most frequent task names among the first 2,000 of each list."""
    import json
    from collections import Counter

    keys = list(keys)
    total = sum(broker.llen(key) for key in keys)
    if not by_task:
        return {"total": total}
    found: Counter[str] = Counter()
    for key in keys:
        for raw in broker.lrange(key, -2000, -1):  # the oldest: kombu pushes left, pops right
            found[json.loads(raw).get("headers", {}).get("task", "?")] += 1
    return {"total": total, **dict(found.most_common(4))}


def fired_by(run_at: datetime) -> dict[str, Any]:
    """When the last schedule's firing was logged (UpdateSchedule.last_checked_at: the
    start of its firing), clusters' and single systems', from the update time."""
    from updates.models import UpdateSchedule

    out = {}
    for kind, rows in (
        ("clusters", UpdateSchedule.objects.filter(cluster__isnull=False)),
        ("single_systems", UpdateSchedule.objects.filter(node__isnull=False)),
    ):
        times = [(at - run_at).total_seconds() for at in rows.values_list("last_checked_at", flat=True) if at]
        out[kind] = summary(times)
    return out


def read_plan(run_at: datetime) -> dict[str, tuple[int, datetime, timedelta]]:
    """Every cluster node's plan entry for the occurrence, as planned at the firing:
    hostname -> (plan, planned time, expected duration)."""
    from updates.models import PlanEntry

    rows = PlanEntry.objects.filter(plan__occurrence=run_at, excluded=False)
    return {
        h: (p, at, exp) for h, p, at, exp in rows.values_list("node__hostname", "plan_id", "planned_at", "expected")
    }


def collect(run_at: datetime, plan: dict[str, tuple[int, datetime, timedelta]], durations: dict[str, float],
            state_dir: Path) -> list[dict[str, Any]]:  # fmt: skip
    """Per node, seconds from run_at: node-side times (TimedDriver) and the database's."""
    from bench.rollout_driver import TimedDriver
    from updates.models import PlanEntry, UpdateRun

    final = dict(
        PlanEntry.objects.filter(plan__occurrence=run_at).values_list("node__hostname", "planned_at")
    )  # after any replan

    def s(moment: datetime | None) -> float:
        return math.nan if moment is None else (moment - run_at).total_seconds()

    base = run_at.timestamp()
    rows = []
    runs = UpdateRun.objects.filter(scheduled_for=run_at).select_related("node").prefetch_related("steps")
    for run in runs:
        host = run.node.hostname
        steps = {st.name: st for st in run.steps.all()}
        events = TimedDriver(host, state_dir / host).events()
        planned = s(plan[host][1]) if host in plan else 0.0
        rows.append({
            "node": host, "cluster": run.node.cluster_id, "state": run.state, "error": run.error[:200],
            "duration": durations[host], "planned": planned, "planned_final": s(final.get(host)) if host in plan
            else 0.0, "created": s(run.created_at), "exclude": events.get("exclude", math.nan) - base,
            "drain": events.get("drain", math.nan) - base, "install": events.get("install", math.nan) - base,
            "db_drain": s(steps["drain"].started_at) if "drain" in steps else math.nan,
            "hold_end": s(steps["hold"].finished_at) if "hold" in steps else math.nan,
            "slot_held": s(steps["slot"].finished_at) if "slot" in steps else math.nan,
            "finished": s(run.finished_at),
        })  # fmt: skip
    return rows


# --- the report -----------------------------------------------------------------------------


def control_log_counts(log: Path) -> dict[str, Any]:
    text = log.read_text() if log.exists() else ""
    return {
        # Stopping the worker at the end kills what it still runs (SIGTERM): not the update's.
        "errors in the control log": len(
            errors := [e for e in text.splitlines() if "ERROR/" in e and "SIGTERM" not in e]
        ),
        "first errors": [line[:300] for line in errors[:5]],
        "control.hold retries": len(re.findall(r"Task control\.hold\[[^]]+\] retry", text)),
        "control.verify retries": len(re.findall(r"Task control\.verify\[[^]]+\] retry", text)),
    }


def report(count: int, phases: Phases, rows: list[dict[str, Any]], firsts: set[str],
           plan: dict[str, tuple[int, datetime, timedelta]], durations: dict[str, float],
           rest: dict[str, list[float]], samples: list[dict[str, Any]], control_cpu: float,
           work: Path) -> dict[str, Any]:  # fmt: skip
    from bench.orchestration import task_runtimes

    run_at = phases.run_at
    by_node = {r["node"]: r for r in rows}
    succeeded = sum(r["state"] == "succeeded" for r in rows)
    first_rows = [by_node[h] for h in firsts if h in by_node]
    first_off = [r["drain"] for r in first_rows]
    missing = len(firsts) - sum(v == v for v in first_off)
    every_first = max(first_off) if first_off and not missing else math.inf
    clustered_first = [r["drain"] for r in first_rows if r["cluster"]]
    single_first = [r["drain"] for r in first_rows if not r["cluster"]]
    # The plan's ideal: each node at its planned time (a single system at the update time) plus its install.
    starts = {h: (plan[h][1] if h in plan else run_at) for h in durations}
    ideal = (ideal_end(starts, durations) - run_at).total_seconds()
    planned_end = max(((at + exp - run_at).total_seconds() for _, at, exp in plan.values()), default=math.nan)
    makespan = phases.ended_at
    late_off = [r["drain"] - r["planned"] for r in rows]  # every node: logged off after its own time
    moved = sum(r["planned_final"] > r["planned"] + 1e-6 for r in rows if r["cluster"])
    out_before = [r["exclude"] for r in first_rows if r["cluster"]]
    during = [s for s in samples if s["t"] >= -phases.lead.total_seconds()]
    burst = [s for s in during if 0 <= s["t"] <= FIRST_WAVE_TARGET]
    pages: dict[str, Any] = {}
    waiting = [s["control_queue"]["total"] for s in during]
    metrics = [
        metric("fleet: nodes (clusters of 4 / single systems)", count, "nodes"),
        metric("schedules due at one update time", phases.schedules, ""),
        metric("runs succeeded", succeeded, "", f"= {count}", succeeded == count),
        metric(
            f"first waves ({len(firsts)} nodes): update time -> every one disconnected",
            every_first,
            "s",
            f"<= {FIRST_WAVE_TARGET:g}",
            every_first <= FIRST_WAVE_TARGET,
        ),
        metric("first waves: update time -> disconnected, p50", percentile(first_off, 50), "s"),
        metric("first waves not disconnected", missing, "nodes", "= 0", missing == 0),
        metric("first waves, clusters: last disconnected", max(clustered_first, default=math.nan), "s"),
        metric("first waves, single systems: last disconnected", max(single_first, default=math.nan), "s"),
        metric(
            "clusters' first waves: last out of the load balancer",
            max(out_before, default=math.nan),
            "s",
            "< 0 (before the update time)",
            max(out_before, default=0.0) < 0,
        ),
        metric("whole fleet done: update time -> last run finished", makespan, "s"),
        metric("plan's ideal (planned times + installs, no overhead)", ideal, "s"),
        metric("whole fleet done / plan's ideal", makespan / ideal if ideal > 0 else math.nan, "x"),
        metric("latest planned end of the plans (planned time + expected)", planned_end, "s"),
        metric("whole fleet done / latest planned end", makespan / planned_end if planned_end > 0 else math.nan, "x"),
        metric("every node: logged off after its own planned time, p50", percentile(late_off, 50), "s"),
        metric("every node: logged off after its own planned time, max", max(late_off, default=math.nan), "s"),
        metric("cluster nodes moved later by a replan", moved, "nodes"),
        metric("control queue during the update: most messages waiting", max(waiting, default=0), "messages"),
        metric("control queue when the fleet was done", waiting[-1] if waiting else 0, "messages"),
    ]
    for name in ("node list", "node page", "cluster page"):
        times = [s[name] for s in during]
        peak = [s[name] for s in burst]
        pages[name] = {"rest_ms": summary(rest[name]), "during_ms": summary(times), "first_minute_ms": summary(peak)}
        mid = median(times) if times else math.inf
        metrics.append(metric(f"admin {name} during the update: median of {len(times)}", mid, "ms",
                              f"< {PAGE_TARGET_MS:g}", mid < PAGE_TARGET_MS))  # fmt: skip
        metrics.append(metric(f"admin {name} during the update: max (at rest: median {median(rest[name]):.0f})",
                              max(times, default=math.nan), "ms"))  # fmt: skip
    return {
        "name": "fleet-update",
        "metrics": metrics,
        "details": {
            "nodes": count,
            "clusters": len({r["cluster"] for r in rows if r["cluster"]}),
            "settings": {
                "cap": CAP,
                "lb_lead_time_s": phases.lead.total_seconds(),
                "expected_update_s": EXPECTED.total_seconds(),
                "install_s": [LOW, HIGH],
                "seed": SEED,
                "nodes_per_worker": NODES_PER_WORKER,
            },
            "download_at": phases.download_at.isoformat(),
            "run_at": run_at.isoformat(),
            "download_lead_s": (run_at - phases.download_at).total_seconds(),
            "setup_s": round(phases.setup_s, 1),
            "schedule_saves_s": round(phases.saves_s, 1),
            "downloads_succeeded": phases.downloads_ok,
            "downloads_done_s": phases.downloads_done,
            "timed_out": phases.timed_out,
            "first_wave_off_s": {
                "all": summary(first_off),
                "clusters": summary(clustered_first),
                "single_systems": summary(single_first),
            },
            "clusters_first_out_s": summary(out_before),
            "clusters_first_wave_path_s": {
                "update time -> hold done (DB)": summary([r["hold_end"] for r in first_rows if r["cluster"]]),
                "hold done -> slot held (DB)": summary(
                    [r["slot_held"] - r["hold_end"] for r in first_rows if r["cluster"]]
                ),
                "slot held -> drain on the node": summary(
                    [r["drain"] - r["slot_held"] for r in first_rows if r["cluster"]]
                ),
            },
            "schedules_fired_s (last_checked_at, from the update time)": phases.fired,
            "download_phase_s (download instant -> every node downloaded)": round(
                phases.downloads_done + (run_at - phases.download_at).total_seconds(), 1
            ),
            "off_after_planned_s": summary(late_off),
            "db_drain_s (control's receive time of the drain report)": summary(
                [by_node[h]["db_drain"] for h in firsts if h in by_node]
            ),
            "runs_created_s": summary([r["created"] for r in rows]),
            "finished_s": summary([r["finished"] for r in rows]),
            "pages": pages,
            "control_cpu_cores (download instant -> fleet done)": round(control_cpu, 2),
            "control_log": control_log_counts(work / "first.log"),
            "control_task_runtimes": task_runtimes(work / "first.log") if (work / "first.log").exists() else {},
            "failed_runs": [
                {"node": r["node"], "state": r["state"], "error": r["error"]} for r in rows if r["state"] != "succeeded"
            ][:10],
            "progress": samples,
        },
    }
