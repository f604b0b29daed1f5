"""6. Fleet scale: heartbeats of 10,000 nodes on one control host.

The fleet of issue 16: 2,000 clusters of 4 nodes and 2,000 single systems (scaled
down in proportion for a smaller --nodes), in PostgreSQL (a database of its own on
127.0.0.1:5432, dropped afterwards), each node with its own accepted key. The
control side runs unchanged: one control host as the Procfile runs it, a control
worker with 2 processes (-c 2, -E, -l INFO) and `manage.py heartbeats` beside it. The
agents are simulated cheaply (bench/fleet_agents.py: many nodes per process, each
signing its own numbered heartbeats at the production interval of 15 s, pushed onto
the heartbeats list as an agent pushes them).

1. The knee: the fleet grows in steps (each added share of nodes gets a process of
   its own); each step runs for STEP_SECONDS and is measured in its second half:
   heartbeat-to-database lag p50/p99 (from the send time to Node.reported_at, for
   the heartbeats that were written: those that change something, and one in two
   that only say the node was seen) and whether what waits for the control host (the
   control queue and the heartbeats list) stays bounded. The
   knee is the largest size whose p99 lag is under 5 s with a queue that does not
   grow. Stepping stops at the first size that does not keep up.
2. The long run: the largest size that kept up (the whole fleet if it did) for
   --minutes: the control queue's length and the lag over time (the picture in
   docs/fleet.png), Redis memory and connections, the rate of task events (what
   Flower receives) and the CPU each part used.

--concurrency N starts each control worker with N processes instead of the Procfile's 2
(what more pool processes in one worker move, against a second worker host).

Baseline, in the same run: the simulated agents' own send rate needs nothing of
the control plane; the figure that matters is heartbeats processed per second of
control CPU against heartbeats offered.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.shared.protocol import CONTROL_QUEUE, HEARTBEATS
from bench import netns
from bench.common import ROOT, SECRET, free_port, metric, percentile, spawn, stop_process
from tgpadmin.broker_acl import queue_keys  # the control queue's lists, one per priority
from tgpadmin.processes import die_with_parent

OPTIONS = {"nodes", "minutes", "concurrency"}
INTERVAL = 15.0  # the agents' production heartbeat interval (agent/config.py)
STEP_SECONDS = 75.0  # five heartbeats of every node
LAG_TARGET = 5.0
PICTURE = ROOT / "docs" / "fleet.png"


def run(nodes: int = 10000, minutes: float = 10.0, concurrency: int = 2) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tgp-bench-fleet-"))
    db = f"tgp_bench_fleet_{os.getpid()}"
    try:
        with ExitStack() as stack:
            prefix = stack.enter_context(netns.host("tgpfleet")) if netns.available() else []
            redis_url = stack.enter_context(redis_server(work, also=netns.HERE if prefix else None))
            setup_django(work / "var", db)
            fleet = Fleet(work, redis_url, db, prefix, concurrency)
            stack.callback(fleet.stop)
            return fleet.measure(nodes, minutes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        drop_database(db)


@contextmanager
def redis_server(work: Path, also: str | None) -> Iterator[str]:
    """The benchmark's own Redis (as bench.common's), also listening on the address the
    second host reaches this one at. Protected mode would refuse that host: a bench
    Redis on loopback and a veth pair of this machine only."""
    from tgpadmin import embedded_redis

    port = free_port()
    cmd = embedded_redis.command(port, work / "redis", persist=False, also=also, protected=also is None)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
    try:
        embedded_redis.wait_until_up(port)
        url = f"redis://127.0.0.1:{port}/0"
        os.environ["REDIS_URL"] = url
        yield url
    finally:
        stop_process(proc)


def psql(sql: str) -> None:
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qAtc", sql], check=True, capture_output=True)


def drop_database(db: str) -> None:
    from django.db import connections

    connections.close_all()
    psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def database_url(db: str) -> str:
    return f"postgres://postgres@127.0.0.1:5432/{db}"


def setup_django(var_dir: Path, db: str) -> None:
    """Django on a PostgreSQL database of the benchmark's own, migrated."""
    psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    psql(f"CREATE DATABASE {db}")
    (var_dir / "static").mkdir(parents=True, exist_ok=True)
    os.environ.update(
        DATABASE_URL=database_url(db), DJANGO_SETTINGS_MODULE="tgpadmin.settings", TGP_VAR_DIR=str(var_dir),
        TGP_LOG_LEVEL="WARNING",
    )  # fmt: skip
    os.environ.setdefault("DJANGO_SECRET_KEY", SECRET)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)


def seed(count: int, work: Path) -> list[tuple[str, str]]:
    """The fleet in the database: four fifths in clusters of 4, the rest single
    systems, each node as its last heartbeat left it and with an accepted key.
    Returns (hostname, private key) in the order the steps add them: mixed, so
    that every step has clusters and single systems alike."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    from django.db import connection
    from django.utils import timezone

    from agent.shared import signing
    from nodes.models import Cluster, Node, NodeKey

    clusters = Cluster.objects.bulk_create(Cluster(name=f"fc{i:05d}") for i in range(count * 4 // 5 // 4))
    rows = []
    for i in range(count):
        cluster = clusters[i // 5] if clusters and i % 5 and i // 5 < len(clusters) else None
        rows.append(Node(
            hostname=f"f{i:05d}", cluster=cluster, installed_version="2.1.0",
            installed_packages={"tightgate-base": "2.1.0", "tightgate-browser": "2.1.0"}, logged_in_users=["alice"],
            boot_id=f"boot-f{i:05d}", agent_instance=f"agent-f{i:05d}", reported_maintenance=False,
            last_seen=timezone.now(), reported_at=timezone.now(),
        ))  # fmt: skip
    nodes = Node.objects.bulk_create(rows, batch_size=2000)
    keys, out = [], []
    for node in nodes:
        key = Ed25519PrivateKey.generate()
        public = signing.public_b64(key)
        keys.append(NodeKey(node=node, public_key=public, fingerprint=signing.fingerprint(public),
                            state=NodeKey.State.ACCEPTED, note="accepted by the benchmark"))  # fmt: skip
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        out.append((node.hostname, base64.b64encode(raw).decode()))
    NodeKey.objects.bulk_create(keys, batch_size=2000)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # as autovacuum would soon: the planner's figures for the key lookup
    return out


class Observer:
    """Listens to the task events (as Flower does) and samples the control queue and Redis."""

    def __init__(self, redis_url: str) -> None:
        import redis

        from tgpadmin.celery import app

        self.app, self.redis = app, redis.Redis.from_url(redis_url)
        self.done: list[tuple[float, float]] = []  # (stored at, lag) per heartbeat written
        self.events: Counter[int] = Counter()  # events per second
        self.samples: list[dict[str, float]] = []
        self.stopping = threading.Event()
        self.receiver: Any = None
        self.threads: list[threading.Thread] = []

    def on_event(self, event: dict[str, Any]) -> None:
        self.events[int(time.time())] += 1

    def poll(self) -> None:
        """Each heartbeat written to the database, with its lag: stored at (the control
        plane's clock) minus sent at (its sequence number, bench/fleet_agents.py)."""
        from django.db import connection

        from nodes.models import Node

        seen: set[tuple[int, int]] = set()
        since = time.time() - 5
        while not self.stopping.wait(1.0):
            began = time.time()
            rows = Node.objects.filter(reported_at__gte=datetime.fromtimestamp(since - 2, UTC), report_seq__gt=10**15)
            for pk, seq, stored in rows.values_list("pk", "report_seq", "reported_at"):
                if (pk, seq) not in seen:
                    seen.add((pk, seq))
                    self.done.append((stored.timestamp(), stored.timestamp() - seq / 1e6))
            since = began
        connection.close()

    def listen(self) -> None:
        with self.app.connection() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self.on_event})
            try:
                self.receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception:
                if not self.stopping.is_set():  # the end of the run stops Redis under it
                    raise

    def sample(self) -> None:
        while not self.stopping.wait(1.0):
            info = self.redis.info()
            # What waits for the control host: its queue and the heartbeats not yet taken.
            length = sum(self.redis.llen(key) for key in (*queue_keys(CONTROL_QUEUE, literal=False), HEARTBEATS))
            self.samples.append({
                "at": time.time(), "queue": length, "memory_mb": info["used_memory"] / 2**20,
                "clients": info["connected_clients"],
            })  # fmt: skip

    def start(self) -> None:
        self.threads = [threading.Thread(target=t, daemon=True) for t in (self.listen, self.sample, self.poll)]
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.receiver is not None:
            self.receiver.should_stop = True
        for thread in self.threads:
            thread.join(timeout=5)  # before Redis and the database go

    def lags(self, since: float, until: float) -> list[float]:
        return [lag for at, lag in self.done if since <= at < until]

    def queue(self, since: float, until: float) -> list[float]:
        return [s["queue"] for s in self.samples if since <= s["at"] < until]


def cpu_seconds(proc: Any) -> float:
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        return sum(sum(p.cpu_times()[:2]) for p in [parent, *parent.children(recursive=True)])
    except psutil.Error:
        return 0.0


def steps_for(nodes: int) -> list[int]:
    return [n for n in (1000, 1500, 2000, 2500, 3500, 5000, 7500) if n < nodes] + [nodes]


def keeps_up(lags: list[float], queue: list[float]) -> bool:
    """p99 lag under target and a queue that does not grow: its last samples no longer
    than a few seconds of heartbeats (it drains as fast as it fills)."""
    if not lags or not queue:
        return False
    return percentile(lags, 99) < LAG_TARGET and max(queue[-10:]) <= max(50.0, 3 * len(lags) / STEP_SECONDS * 2)


class Fleet:
    """The run: control workers (this host, and the second in its namespace), the
    simulated agents, the observer."""

    def __init__(self, work: Path, redis_url: str, db: str, prefix: list[str], concurrency: int = 2) -> None:
        self.work, self.redis_url, self.db, self.prefix = work, redis_url, db, prefix
        self.concurrency = concurrency  # pool processes per control worker: the Procfile's 2
        self.controls: list[Any] = []  # the processes of every control host
        self.control_hosts = 0
        self.agents: list[Any] = []
        self.running = 0  # nodes whose agents run
        self.keys: list[tuple[str, str]] = []
        self.observer: Observer | None = None
        self.forwarder: netns.Forwarder | None = None

    def env(self, second: bool = False) -> dict[str, str]:
        redis_url, db_url = self.redis_url, database_url(self.db)
        if second and self.prefix:
            assert self.forwarder is not None
            redis_url = redis_url.replace("127.0.0.1", netns.HERE)
            db_url = f"postgres://postgres@{netns.HERE}:{self.forwarder.port}/{self.db}"
        return {
            **os.environ, "REDIS_URL": redis_url, "DJANGO_SECRET_KEY": SECRET, "TGP_VAR_DIR": str(self.work / "var"),
            "DATABASE_URL": db_url, "TGP_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1",
        }  # fmt: skip

    def start_control(self, second: bool = False) -> None:
        """A control worker as the Procfile starts it (-c 2 unless --concurrency), task events, INFO."""
        from bench.orchestration import wait
        from tgpadmin.celery import app

        if second and self.prefix and self.forwarder is None:
            self.forwarder = netns.Forwarder(5432)  # the machine's PostgreSQL listens on loopback only
        name = f"control-{uuid.uuid4().hex[:6]}@{'second' if second else 'first'}"
        cmd = [sys.executable, "-m", "celery", "-A", "tgpadmin", "worker", "-Q", "control", "-n", name]
        cmd += ["-c", str(self.concurrency), "-E", "--without-gossip", "--without-mingle", "-l", "INFO"]
        cmd = [*(self.prefix if second else []), *cmd]
        host = name.split("@")[1]
        self.controls.append(spawn(cmd, self.env(second), self.work / f"{host}.log"))
        # Beside it, as in the Procfile: the heartbeats' consumer of this host.
        heartbeats = [*(self.prefix if second else []), sys.executable, "manage.py", "heartbeats"]
        self.controls.append(spawn(heartbeats, self.env(second), self.work / f"{host}-heartbeats.log"))
        self.control_hosts += 1
        wait(lambda: app.control.ping(destination=[name], timeout=0.5), 60, f"the control worker {name}")

    def grow(self, size: int) -> None:
        """Agents for the nodes up to `size`: a process for each 2,500 (one sends up to ~2,000 a second)."""
        for lo in range(self.running, size, 2500):
            share = self.keys[lo : min(size, lo + 2500)]
            path = self.work / f"agents-{len(self.agents)}.jsonl"
            path.write_text("".join(json.dumps(row) + "\n" for row in share))
            cmd = [sys.executable, "-m", "bench.fleet_agents", str(path), "--interval", str(INTERVAL)]
            cmd += ["--out", str(path.with_suffix(".json"))]
            self.agents.append(spawn(cmd, self.env(), path.with_suffix(".log")))
        self.running = max(self.running, size)

    def shrink(self, size: int) -> None:
        """Only the nodes up to `size` from now on, and nothing the others left queued."""
        if self.running > size:
            self.stop_agents()
            assert self.observer is not None
            self.observer.redis.delete(*queue_keys(CONTROL_QUEUE, literal=False), HEARTBEATS)
            self.grow(size)

    def stop_agents(self) -> None:
        for proc in self.agents:
            stop_process(proc)
        self.agents, self.running = [], 0

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
        self.stop_agents()
        for proc in self.controls:
            stop_process(proc)
        if self.forwarder is not None:
            self.forwarder.stop()

    def step(self, size: int) -> dict[str, Any]:
        assert self.observer is not None
        self.grow(size)
        begin, cpu0 = time.time(), sum(map(cpu_seconds, self.controls))
        time.sleep(STEP_SECONDS)
        mid, end = begin + STEP_SECONDS / 2, time.time()
        lags, queue = self.observer.lags(mid, end), self.observer.queue(mid, end)
        step = {
            "nodes": size, "control_hosts": self.control_hosts, "offered_per_s": round(size / INTERVAL, 1),
            "written": len(lags), "lag_p50_s": round(percentile(lags, 50), 3),
            "lag_p99_s": round(percentile(lags, 99), 3), "queue_end": queue[-1] if queue else None,
            "queue_max": max(queue) if queue else None,
            "control_cpu": round((sum(map(cpu_seconds, self.controls)) - cpu0) / (end - begin), 2),
            "ok": keeps_up(lags, queue),
        }  # fmt: skip
        print(f"   {step}", flush=True)
        return step

    def knee(self, sizes: list[int]) -> tuple[int, list[dict[str, Any]]]:
        """The largest of `sizes` (ascending) kept up with; stops at the first that is not."""
        found, steps = 0, []
        for size in sizes:
            steps.append(self.step(size))
            if not steps[-1]["ok"]:
                break
            found = size
        return found, steps

    def measure(self, nodes: int, minutes: float) -> dict[str, Any]:
        print(f"   seeding {nodes} nodes in PostgreSQL ...", flush=True)
        self.keys = seed(nodes, self.work)
        self.start_control()
        self.observer = Observer(self.redis_url)
        self.observer.start()
        sizes = steps_for(nodes)
        knee1, steps = self.knee(sizes)
        self.shrink(knee1 or sizes[0])
        long = self.long_run(knee1 or sizes[0], minutes)
        knee2 = knee1
        if knee1 < nodes:  # a second control host: how far the knee moves
            self.start_control(second=True)
            self.shrink(knee1)
            more, more_steps = self.knee([n for n in sizes if n > knee1])
            knee2, steps = max(knee1, more), steps + more_steps
        return result(nodes, steps, knee1, knee2, long, bool(self.prefix), self.concurrency)

    def long_run(self, size: int, minutes: float) -> dict[str, Any]:
        assert self.observer is not None
        observer = self.observer
        time.sleep(5)  # what the shrink left in flight
        begin, cpu0, events0 = time.time(), sum(map(cpu_seconds, self.controls)), sum(observer.events.values())
        agents0 = sum(map(cpu_seconds, self.agents))
        time.sleep(minutes * 60)
        end = time.time()
        lags, samples = observer.lags(begin, end), [s for s in observer.samples if begin <= s["at"] < end]
        series = minute_series(observer, begin, end)
        picture(series, size)
        return {
            "nodes": size, "minutes": minutes, "written": len(lags),
            "lag_p50_s": round(percentile(lags, 50), 3), "lag_p99_s": round(percentile(lags, 99), 3),
            "queue_max": max((s["queue"] for s in samples), default=0),
            "queue_end": samples[-1]["queue"] if samples else 0,
            "redis_memory_mb": round(max((s["memory_mb"] for s in samples), default=0), 1),
            "redis_clients": max((s["clients"] for s in samples), default=0),
            "events_per_s": round((sum(observer.events.values()) - events0) / (end - begin), 1),
            "control_cpu": round((sum(map(cpu_seconds, self.controls)) - cpu0) / (end - begin), 2),
            "agents_cpu": round((sum(map(cpu_seconds, self.agents)) - agents0) / (end - begin), 2), "series": series,
        }  # fmt: skip


def minute_series(observer: Observer, begin: float, end: float) -> list[dict[str, float]]:
    """Per 10 s: the queue's largest length and the lag p99 of what was processed."""
    rows = []
    for t in range(int(begin), int(end), 10):
        lags, queue = observer.lags(t, t + 10), observer.queue(t, t + 10)
        rows.append({"t": t - int(begin), "queue": max(queue, default=0),
                     "lag_p99": round(percentile(lags, 99), 3) if lags else 0.0})  # fmt: skip
    return rows


def picture(series: list[dict[str, float]], size: int) -> None:
    from bench.fleet_png import draw

    draw(series, size, PICTURE)


def result(nodes: int, steps: list[dict[str, Any]], knee1: int, knee2: int, long: dict[str, Any],
           netns_used: bool, concurrency: int) -> dict[str, Any]:  # fmt: skip
    second = "a second host (network namespace)" if netns_used else "a second worker on this host (no netns here)"
    at = f"long run at {long['nodes']} nodes"
    metrics = [
        metric("fleet asked for", nodes, "nodes"),
        metric("pool processes per control worker (-c)", concurrency, ""),
        metric("knee: largest fleet one control host keeps up with", knee1, "nodes", f">= {nodes}", knee1 >= nodes),
        metric(f"knee with {second}", knee2, "nodes"),
        metric(f"{at}: heartbeat-to-database lag p50", long["lag_p50_s"], "s"),
        metric(f"{at}: lag p99", long["lag_p99_s"], "s", f"< {LAG_TARGET:g}", long["lag_p99_s"] < LAG_TARGET),
        metric(
            f"{at}: waiting at the end, control queue and heartbeats list (max {long['queue_max']})",
            long["queue_end"],
            "messages",
            "bounded",
            long["queue_end"] <= max(50, long["nodes"] / INTERVAL * 3),
        ),  # fmt: skip
        metric(f"{at}: Redis memory (max)", long["redis_memory_mb"], "MiB"),
        metric(f"{at}: Redis connections (max)", long["redis_clients"], ""),
        metric(f"{at}: task events (what Flower receives)", long["events_per_s"], "/s"),
        metric(f"{at}: control worker CPU", long["control_cpu"], "cores"),
        metric(f"{at}: simulated agents' CPU (same machine)", long["agents_cpu"], "cores"),
    ]
    return {"name": "fleet", "metrics": metrics, "steps": steps, "long": long}
