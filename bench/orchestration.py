"""2. Orchestration overhead per step: from one step ending to the next starting.

A real control worker and real node agents (simulated appliances) on a private
Redis and SQLite database, a signed demo repository on loopback HTTP. Auto-Update
runs one after the other (fresh nodes on 2.1.0, a batch of agents at a time), then:

- Gaps as recorded: UpdateStep.finished_at of step k to started_at of step k+1 (for
  the last step: UpdateRun.finished_at, written by control.complete). A node step's
  times are the node's own (each report carries when it happened on the node); a
  control step's (verify, complete) are when the control worker ran it. So a
  node -> node gap is the hand-off on the node (its report, the chain's next
  message through Redis, the worker taking it), and a gap that crosses to the
  control plane includes the control queue.
- What a gap is made of: the control worker's own run time per task, parsed from
  its log ("Task control.record_step[...] succeeded in 0.0042s"). Celery task
  events would give node-side times too, but a node worker buffers them and the
  simulated reboot (os._exit) drops the buffer, so they are incomplete.

Baseline (issue 16): a bare Celery round trip on the same Redis in the same run
(bench/roundtrip.py: a task on a node queue whose outcome is a task on the control
queue). Target: the gap p50 at most 1.5 x the baseline's p50; the absolute figures are
reported and move with the machine. The reboot step's own duration (the simulated
appliance restarting its worker) and verify's retries are step durations, not gaps.
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path
from statistics import median
from typing import Any

from bench.common import SECRET, database_url, enroll, in_workspace, metric, percentile, spawn, stop_process
from tgpadmin.processes import stop_processes
from tgpadmin.processes import wait_for as wait

OPTIONS = {"runs"}
BATCH = 6  # agents alive at once: each is a supervisor plus a worker, and the machine has 2 cores
TARGET_RATIO = 1.5  # the gap p50 against a bare Celery round trip's p50
REPORTS = ("control.record_step", "control.node_report")  # messages about a run, not steps of its chain


def run(runs: int = 24) -> dict[str, Any]:
    return in_workspace("orch", lambda work, redis_url: measure(work, redis_url, runs))


def base_env(work: Path, redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "DJANGO_SECRET_KEY": SECRET,
        "TGP_VAR_DIR": str(work / "var"),
        "TGP_HEARTBEAT_INTERVAL": "2",
        "TGP_REBOOT_TIMEOUT": "60",
        "TGP_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }


def build_repo(root: Path) -> tuple[Path, str]:
    from updates.demo import write_demo_sources
    from updates.releases import import_index
    from updates.repository import build_repository, export_root

    write_demo_sources(root / "src", package_bytes=64 * 1024)
    index = build_repository(root / "src", root / "out", root / "keys")
    export_root(root / "out", root / "root.json")
    import_index(index)
    return root / "out", str(root / "root.json")


def start_control(work: Path, redis_url: str) -> list[Any]:
    """A control host as the Procfile runs it: the control worker and `manage.py heartbeats`."""
    from tgpadmin.celery import app

    name = f"control-{uuid.uuid4().hex[:6]}@bench"
    cmd = [sys.executable, "-m", "celery", "-A", "tgpadmin", "worker", "-Q", "control", "-n", name]
    # INFO: the worker logs each task's run time, which tells what a gap is made of.
    cmd += ["-c", "2", "-E", "--without-gossip", "--without-mingle", "-l", "INFO"]
    env = {**base_env(work, redis_url), "DATABASE_URL": database_url()}
    heartbeats = [sys.executable, "manage.py", "heartbeats"]
    procs = [spawn(cmd, env, work / "control.log"), spawn(heartbeats, env, work / "heartbeats.log")]
    wait(lambda: app.control.ping(destination=[name], timeout=0.5), 60, "the control worker")
    return procs


def make_nodes(count: int, state_dir: Path) -> list[Any]:
    from agent.drivers.simulated import SimulatedDriver
    from nodes.models import Node
    from updates.demo import DEMO_RELEASES

    packages = next(p for _, v, *_, p in DEMO_RELEASES if v == "2.1.0")
    nodes = []
    for _ in range(count):
        node = Node.objects.create(hostname=f"bench-{uuid.uuid4().hex[:8]}")
        SimulatedDriver(node.hostname, state_dir / node.hostname).seed(
            version="2.1.0", packages=packages, users=["alice", "bob"], cluster=False
        )
        nodes.append(node)
    enroll(nodes, state_dir)
    return nodes


def start_agents(nodes: list[Any], work: Path, env: dict[str, str]) -> list[Any]:
    from django.db.models import F

    from nodes.models import Node

    env = {**env, "DATABASE_URL": "postgres://nobody@127.0.0.1:1/no-database-for-agents"}
    procs = [spawn([sys.executable, "-m", "agent", n.hostname], env, work / "agents.log") for n in nodes]
    for node in nodes:
        wait(lambda n=node: Node.objects.get(pk=n.pk).agent_instance, 60, f"the first report of {node}")
    # The supervisor reports at once; its worker takes a second or two of CPU to start.
    # Runs begin when every worker consumes: the gaps are those of running agents, not
    # of six Python processes booting on the same two cores. (Agents answer no ping:
    # remote control is off; a worker's ready report is stored as worker_instance.)
    ready = Node.objects.filter(pk__in=[n.pk for n in nodes], worker_instance=F("agent_instance"))
    wait(lambda: ready.exclude(worker_instance="").count() == len(nodes), 60, "the agent workers")
    return procs


def update_one(node: Any, release: Any) -> int:
    from nodes.models import Node
    from updates.models import UpdateRun
    from updates.runs import start

    run = start.start_update(Node.objects.get(pk=node.pk), release)
    done = wait(lambda: UpdateRun.objects.filter(pk=run.pk).exclude(state="running").first(), 90, f"run {run.pk}")
    if done.state != "succeeded":
        raise RuntimeError(f"run {run.pk} {done.state}: {done.error}")
    return run.pk


def task_runtimes(log: Path) -> dict[str, dict[str, float]]:
    """Run time of each control task as the control worker logs it ("succeeded in 0.0042s"):
    what the worker spends on one report, database writes included."""
    times: dict[str, list[float]] = defaultdict(list)
    for found in re.finditer(r"Task (control\.\w+)\[[^]]+\] succeeded in ([0-9.e-]+)s", log.read_text()):
        times[found.group(1)].append(float(found.group(2)) * 1000)
    return {
        name: {"n": len(v), "p50_ms": round(median(v), 2), "p99_ms": round(percentile(v, 99), 2)}
        for name, v in sorted(times.items())
    }


def kind(step: str) -> str:
    return "control" if step in ("verify", "complete") else "node"


def db_gaps(run_ids: list[int]) -> list[tuple[str, float]]:
    """(transition, ms) from the database. A verify that found the node back at its
    first try has no started_at: that transition is left out."""
    from updates.models import UpdateRun

    gaps = []
    for run in UpdateRun.objects.filter(pk__in=run_ids).prefetch_related("steps"):
        steps = sorted(run.steps.all(), key=lambda s: s.position)
        ends = [(s.name, s.started_at, s.finished_at) for s in steps] + [("complete", run.finished_at, None)]
        for (name, _, finished), (nxt, started, _) in zip(ends, ends[1:], strict=False):
            if finished and started:
                gaps.append((f"{name}->{nxt}", (started - finished).total_seconds() * 1000))
    return gaps


def summarize(gaps: list[tuple[str, float]]) -> dict[str, Any]:
    by: dict[str, list[float]] = defaultdict(list)
    for name, ms in gaps:
        by[name].append(ms)
        a, b = name.split("->")
        by[f"[{kind(a)}->{kind(b)}]"].append(ms)
    values = [ms for _, ms in gaps]
    return {
        "n": len(values),
        "p50_ms": percentile(values, 50),
        "p99_ms": percentile(values, 99),
        "max_ms": max(values, default=float("nan")),
        "min_ms": min(values, default=float("nan")),
        "per_transition": {
            k: {"n": len(v), "p50_ms": round(median(v), 2), "p99_ms": round(percentile(v, 99), 2)}
            for k, v in sorted(by.items())
        },
    }


def measure(work: Path, redis_url: str, runs: int) -> dict[str, Any]:
    from tests.servers import RepoServer
    from updates.models import Release

    repo_dir, pinned_root = build_repo(work / "repo")
    release = Release.objects.get(version="2.2.0")
    run_ids: list[int] = []
    controls = start_control(work, redis_url)
    try:
        with RepoServer(repo_dir) as server:
            env = {**base_env(work, redis_url), "TGP_NODE_STATE_DIR": str(work / "nodes")}
            env |= {"TGP_REPO_URL": server.url, "TGP_REPO_ROOT_FILE": pinned_root}
            started = time.monotonic()
            for batch in range(0, runs, BATCH):
                run_ids += run_batch(min(BATCH, runs - batch), work, env, release)
            wall = time.monotonic() - started
    finally:
        stop_processes(controls)
    from bench import roundtrip

    baseline = roundtrip.measure(work, redis_url)
    result = report(summarize(db_gaps(run_ids)), task_runtimes(work / "control.log"), len(run_ids), wall, baseline)
    result["details"]["steps_started_twice"] = repeated_steps(run_ids)
    return result


def repeated_steps(run_ids: list[int]) -> dict[str, int]:
    """Steps that started more than once (a re-dispatch): they add work, not gaps."""
    from django.db.models import Count

    from updates.models import UpdateStep

    rows = UpdateStep.objects.filter(run_id__in=run_ids, attempts__gt=1).values("name").annotate(n=Count("id"))
    return {row["name"]: row["n"] for row in rows}


def run_batch(count: int, work: Path, env: dict[str, str], release: Any) -> list[int]:
    nodes = make_nodes(count, work / "nodes")
    agents = start_agents(nodes, work, env)
    try:
        return [update_one(node, release) for node in nodes]
    finally:
        for proc in agents:
            stop_process(proc)


def report(
    db: dict[str, Any], tasks: dict[str, Any], runs: int, wall: float, baseline: dict[str, Any]
) -> dict[str, Any]:
    record = tasks.get("control.record_step", {"p50_ms": float("nan"), "p99_ms": float("nan")})
    per = db["per_transition"]
    ratio = db["p50_ms"] / baseline["p50_ms"]
    return {
        "name": "orchestration",
        "metrics": [
            metric("runs", runs, ""),
            metric("baseline: bare Celery round trip p50", baseline["p50_ms"], "ms"),
            metric("baseline: bare Celery round trip p99", baseline["p99_ms"], "ms"),
            metric("gap p50 (recorded step times)", db["p50_ms"], "ms"),
            metric("gap p50 / round trip p50", ratio, "x", f"<= {TARGET_RATIO:g}", ratio <= TARGET_RATIO),
            metric("gap p99 (recorded step times)", db["p99_ms"], "ms"),
            *(metric(f"gap p50 {k}", per[k]["p50_ms"], "ms") for k in per if k.startswith("[")),
            metric("control.record_step run time p50", record["p50_ms"], "ms"),
            metric("control.record_step run time p99", record["p99_ms"], "ms"),
            *signing_cost(),
        ],
        "details": {"db_gaps": db, "control_task_runtimes": tasks, "wall_s": round(wall, 1), "baseline": baseline},
    }


def signing_cost(rounds: int = 2000) -> list[dict[str, Any]]:
    """What the trusted channel adds to each message, on this machine: a node signs a
    report (sequence number under a file lock, Ed25519) and the control plane checks
    it (canonical JSON, Ed25519). The step gap above includes both, per hop."""
    import tempfile
    from dataclasses import replace

    from agent import config, identity
    from agent.shared import signing

    key = signing.Ed25519PrivateKey.generate()
    public = key.public_key()
    body = {"kind": "report", "signer": "gw1", "seq": 1, "message": {"run": 1, "step": "drain", "event": "succeeded",
            "hostname": "gw1", "at": time.time(), "detail": "logged off: alice, bob"}}  # fmt: skip
    started = time.perf_counter()
    for _ in range(rounds):
        envelope = signing.sign(body, key)
    signed = (time.perf_counter() - started) / rounds
    started = time.perf_counter()
    for _ in range(rounds):
        signing.verify(envelope, public)
    checked = (time.perf_counter() - started) / rounds
    with tempfile.TemporaryDirectory() as tmp:
        before = config.config()
        config.configure(replace(before, state_dir=Path(tmp)))
        try:
            started = time.perf_counter()
            for _ in range(rounds):
                identity.next_seq("gw1")
            numbered = (time.perf_counter() - started) / rounds
        finally:
            config.configure(before)
    return [
        metric("sign a report (node)", signed * 1e6, "us"),
        metric("number it (node, file lock)", numbered * 1e6, "us"),
        metric("check its signature (control)", checked * 1e6, "us"),
    ]
