"""5. Beat lag: 500 schedules due in the same minute, from the due time to the
first step of each run starting.

500 single systems (DB rows and simulated appliances on 2.1.0, seeded as
reported) and 500 one-off UpdateSchedules (run_at a whole minute about 1-2
minutes ahead, download_lead 30 s): saving each creates its pair of
django-celery-beat entries, all on one clocked time. Then a real
`celery beat` (DatabaseScheduler, --max-interval 1, as the tests' beat fixture),
a real control worker (-c 2, as bench/orchestration.py), a signed repository on
loopback HTTP (control.scheduled_download looks for updates there first) and one
multi-node worker serving the 500 node queues (bench/multinode.py): node steps
really run, so the first step (notify) really starts.

Per schedule, from the due time (the clocked time of its download entry):
- beat sent the entry (beat's log line "Sending due task ...", its own clock);
- the run was created (UpdateRun.created_at: the control plane's part);
- notify started (UpdateStep.started_at, the control worker's receive time of
  the node's report) and the node's own time of notify (TimedDriver events).
Then, as a second figure, the update phase: from run_at (the update entry) to
drain starting on the node, for the runs that got there within a bounded wait.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from bench.common import database_url, in_workspace, metric, percentile, spawn, stop_process
from bench.orchestration import base_env, start_control, task_runtimes

OPTIONS = {"nodes"}
LEAD = timedelta(seconds=30)
AFTER_DUE = 100.0  # seconds to wait after the due time for every first step
CREATED_TARGET = 5.0  # issue 16: every run created within 5 s of its due time
AFTER_RUN_AT = 45.0  # seconds to wait after run_at for the update phase (second figure)


def run(nodes: int = 500) -> dict[str, Any]:
    return in_workspace("beat", lambda work, redis_url: measure(work, redis_url, nodes))


def next_minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0) + timedelta(minutes=1)


def start_beat(work: Path, redis_url: str) -> Any:
    cmd = [sys.executable, "-m", "celery", "-A", "tgpadmin", "beat", "-l", "INFO", "--max-interval", "1"]
    cmd += ["--pidfile=", "-s", str(work / "beat-schedule")]
    env = {**base_env(work, redis_url), "DATABASE_URL": database_url(), "TGP_LOG_LEVEL": "INFO"}
    return spawn(cmd, env, work / "beat.log")


def beat_sends(log: Path, tz: ZoneInfo) -> dict[int, datetime]:
    """When beat sent each schedule's download entry, from its log (local time, ms)."""
    found = {}
    pattern = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): INFO/MainProcess\] Scheduler: Sending due task tgpadmin schedule (\d+): download"  # noqa: E501
    for m in re.finditer(pattern, log.read_text()):
        at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(microsecond=int(m.group(2)) * 1000, tzinfo=tz)
        found.setdefault(int(m.group(3)), at)
    return found


def measure(work: Path, redis_url: str, count: int) -> dict[str, Any]:
    from django.conf import settings
    from django.utils import timezone

    from bench.multinode import build_noreboot_repo, seed_nodes, start_node_workers
    from tests.servers import RepoServer
    from updates.models import UpdateRun, UpdateSchedule, UpdateStep

    repo_dir, pinned_root = build_noreboot_repo(work / "repo")
    tag = uuid.uuid4().hex[:6]
    hostnames = [f"b{tag}-{i:03d}" for i in range(1, count + 1)]
    setup_started = time.monotonic()
    nodes = seed_nodes(hostnames, work / "nodes")
    # Whole minute far enough ahead for 500 saves and the processes to start (~30 s here); due 60-120 s from now.
    run_at = next_minute(timezone.now() + timedelta(seconds=90))
    for node in nodes:
        UpdateSchedule(name=f"bench {node.hostname}", node=node, run_at=run_at, download_lead=LEAD).save()
    schedules = {s.pk: s for s in UpdateSchedule.objects.select_related("download_task__clocked")}
    due = {pk: s.download_task.clocked.clocked_time for pk, s in schedules.items()}
    due_at = min(due.values())
    procs: list[Any] = []
    with RepoServer(repo_dir) as server:
        os.environ |= {"TGP_REPO_URL": server.url, "TGP_REPO_ROOT_FILE": pinned_root}  # the control worker's env
        env = {**base_env(work, redis_url), "TGP_NODE_STATE_DIR": str(work / "nodes")}
        try:
            procs += start_control(work, redis_url)
            procs += start_node_workers(hostnames, env, work / "nodes.log", workers=1, concurrency=20)
            procs.append(start_beat(work, redis_url))
            setup_s = time.monotonic() - setup_started
            if timezone.now() >= due_at - timedelta(seconds=2):
                raise RuntimeError(f"setup took {setup_s:.0f} s: past the due time {due_at}")
            notify = UpdateStep.objects.filter(name="notify", run__schedule__in=list(due), started_at__isnull=False)
            deadline = due_at + timedelta(seconds=AFTER_DUE)
            while timezone.now() < deadline and notify.count() < count:
                time.sleep(1)
            first_steps_s = (timezone.now() - due_at).total_seconds()
            deadline = run_at + timedelta(seconds=AFTER_RUN_AT)
            drained = UpdateStep.objects.filter(name="drain", run__schedule__in=list(due), started_at__isnull=False)
            while timezone.now() < deadline and drained.count() < count:
                time.sleep(1)
        finally:
            for proc in reversed(procs):
                stop_process(proc)
    runs = list(UpdateRun.objects.filter(schedule__in=list(due)).select_related("node").prefetch_related("steps"))
    sends = beat_sends(work / "beat.log", ZoneInfo(settings.TIME_ZONE))
    return report(runs, due, sends, run_at, work, count, setup_s, first_steps_s)


def summary(values: list[float]) -> dict[str, Any]:
    values = [v for v in values if v == v]
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min_s": round(min(values), 3),
        "p50_s": round(percentile(values, 50), 3),
        "p99_s": round(percentile(values, 99), 3),
        "max_s": round(max(values), 3),
    }


def report(runs: list[Any], due: dict[int, datetime], sends: dict[int, datetime], run_at: datetime, work: Path,
           count: int, setup_s: float, first_steps_s: float) -> dict[str, Any]:  # fmt: skip
    from bench.rollout_driver import TimedDriver

    lags: dict[str, list[float]] = {k: [] for k in ("sent", "created", "notify_db", "notify_node", "drain_node")}
    for pk, at in sends.items():
        if pk in due:
            lags["sent"].append((at - due[pk]).total_seconds())
    for run in runs:
        steps = {st.name: st for st in run.steps.all()}
        zero = due[run.schedule_id]
        lags["created"].append((run.created_at - zero).total_seconds())
        if steps["notify"].started_at:
            lags["notify_db"].append((steps["notify"].started_at - zero).total_seconds())
        events = TimedDriver(run.node.hostname, work / "nodes" / run.node.hostname).events()
        if "notify" in events:
            lags["notify_node"].append(events["notify"] - zero.timestamp())
        if "drain" in events:
            lags["drain_node"].append(events["drain"] - run_at.timestamp())
    s = {k: summary(v) for k, v in lags.items()}
    notified = s["notify_db"].get("n", 0)

    def fig(key: str, q: str) -> float:
        return float(s[key].get(q, math.nan))

    return {
        "name": "beat",
        "metrics": [
            metric("schedules due at once", count, ""),
            metric("runs created", len(runs), "", f"= {count}", len(runs) == count),
            metric("runs whose first step started", notified, "", f"= {count}", notified == count),
            metric("due -> beat sent, p50", fig("sent", "p50_s"), "s"),
            metric("due -> beat sent, max", fig("sent", "max_s"), "s"),
            metric("due -> run created, p50", fig("created", "p50_s"), "s"),
            metric("due -> run created, p99", fig("created", "p99_s"), "s"),
            metric(
                "due -> run created, max",
                fig("created", "max_s"),
                "s",
                f"<= {CREATED_TARGET:g}",
                fig("created", "max_s") <= CREATED_TARGET,
            ),
            metric("due -> first step (notify) started, p50", fig("notify_db", "p50_s"), "s"),
            metric("due -> first step (notify) started, p99", fig("notify_db", "p99_s"), "s"),
            metric("due -> first step (notify) started, max", fig("notify_db", "max_s"), "s"),
            metric("run_at -> drain on the node, p50", fig("drain_node", "p50_s"), "s"),
            metric("run_at -> drain on the node, max", fig("drain_node", "max_s"), "s"),
        ],
        "details": {
            "due_at": min(due.values()).isoformat(),
            "run_at": run_at.isoformat(),
            "lags_s": s,
            "lag_keys": {
                "sent": "beat's log line 'Sending due task' (beat's clock)",
                "created": "UpdateRun.created_at (control worker)",
                "notify_db": "notify UpdateStep.started_at (control worker's receive time of the node's report)",
                "notify_node": "notify called on the node (TimedDriver, node's clock)",
                "drain_node": "from run_at: drain called on the node (update phase)",
            },
            "runs_succeeded": sum(r.state == "succeeded" for r in runs),
            "setup_s": round(setup_s, 1),
            "waited_after_due_s": round(first_steps_s, 1),
            "control_task_runtimes": task_runtimes(work / "control.log"),
        },
    }
