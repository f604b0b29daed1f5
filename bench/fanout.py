"""5b. Fan-out of a schedule's firing (issue 16): how long the control plane takes to
fire a 200-node cluster schedule, against bulk-inserting the same number of bare
UpdateRun rows in the same run, and what one firing of a single system costs.

In this process, on its own SQLite database and Redis, with the signed repository on
loopback HTTP (a firing looks at it first): a cluster of 200 nodes (cap and bound 200,
load-balancer lead 0: every node is in the first wave) and 100 single systems, seeded
as reported (bench/multinode.py), each with a one-off schedule for the same update
time, its download entry due 10 s before. No node runs anything: the chains go to
queues nobody consumes (a node's own work is benchmark 1's and 5's business).

At the download entry's due time, as a control worker process would take them:
- the cluster's download entry: from the call to every run created
  (max UpdateRun.created_at) and to the call's return (the chains published);
- the download entries of the 100 single systems, one after the other: ms per firing.
At the update time, the update entries the same way (the cluster's carries 200 runs
into their update phase; a single system's one).

Baseline, measured in the same run before the firings: bulk-inserting 200 bare
UpdateRun rows (one transaction, one bulk_create), best of five. The ratio is the
figure to compare between machines; the milliseconds move with the machine.

A model of the fan-outs issue 16 names, from the per-firing costs measured here,
on 2 control worker processes and leaving out Celery's own cost per task:
- 500 single systems due in one minute (benchmark 5): 500 x a download firing / 2;
- a fleet-wide update of 10,000 nodes (2,000 clusters of 4, 2,000 single systems):
  at the update time the 2,000 single systems' update entries fire (the clusters'
  fire their load-balancer lead earlier): 2,000 x a single update firing / 2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from statistics import median
from typing import Any

from bench.common import in_workspace, metric

OPTIONS = {"nodes"}
SINGLES = 100
LEAD = timedelta(seconds=10)
PROCESSES = 2  # the control worker's -c 2


def run(nodes: int = 200) -> dict[str, Any]:
    return in_workspace("fanout", lambda work, redis_url: measure(work, nodes))


def wait_until(moment: datetime) -> None:
    from django.utils import timezone

    time.sleep(max(0.0, (moment - timezone.now()).total_seconds()))


def bare_runs(nodes: list[Any], release: Any) -> Timed:
    """Bulk-inserting one bare run per node in one transaction, best of five."""
    from django.db import transaction
    from django.utils import timezone

    from updates.models import UpdateRun

    best = Timed(float("inf"), float("inf"))
    for rep in range(5):
        slot = timezone.now() - timedelta(days=1, minutes=rep)
        rows = [UpdateRun(node=n, release=release, trigger="scheduled", state="succeeded", scheduled_for=slot)
                for n in nodes]  # fmt: skip
        wall, cpu = time.perf_counter(), time.process_time()
        with transaction.atomic():
            UpdateRun.objects.bulk_create(rows)
        best = min(best, Timed(time.perf_counter() - wall, time.process_time() - cpu), key=lambda t: t.wall)
        UpdateRun.objects.filter(scheduled_for=slot).delete()
    return best


@dataclass(frozen=True)
class Timed:
    wall: float  # seconds
    cpu: float  # seconds of this process (SQLite runs in it; Redis does not): less moved by a busy machine
    result: str = ""


def fire_timed(schedule_id: int, kind: str) -> Timed:
    from updates import scheduled

    wall, cpu = time.perf_counter(), time.process_time()
    result = scheduled.fire(schedule_id, kind)
    return Timed(time.perf_counter() - wall, time.process_time() - cpu, result)


def measure(work: Path, count: int) -> dict[str, Any]:
    from django.conf import settings
    from django.db.models import Max
    from django.utils import timezone

    from bench.multinode import build_noreboot_repo, seed_nodes
    from nodes.models import Cluster
    from tests.servers import RepoServer
    from updates.models import Release, UpdateRun, UpdateSchedule

    repo_dir, pinned_root = build_noreboot_repo(work / "repo")
    cluster = Cluster.objects.create(name="fanout", max_parallel_updates=count, max_out_of_lb=count,
                                     lb_lead_time=timedelta(0), expected_update=timedelta(minutes=10))  # fmt: skip
    members = seed_nodes([f"f-{i:04d}" for i in range(count)], work / "nodes", cluster=cluster)
    singles = seed_nodes([f"s-{i:04d}" for i in range(SINGLES)], work / "nodes")
    baseline = bare_runs(members, Release.objects.get(version="2.2.0"))

    with RepoServer(repo_dir) as server:
        settings.TGP_REPO_URL, settings.TGP_REPO_ROOT_FILE = server.url, pinned_root
        update_at = (timezone.now() + LEAD + timedelta(seconds=12)).replace(microsecond=0)
        mine = UpdateSchedule.objects.create(name="cluster", cluster=cluster, run_at=update_at, download_lead=LEAD)
        theirs = [UpdateSchedule.objects.create(name=f"s {n}", node=n, run_at=update_at, download_lead=LEAD)
                  for n in singles]  # fmt: skip

        wait_until(update_at - LEAD)
        fired_at = timezone.now()
        cluster_download = fire_timed(mine.pk, "download")
        created = UpdateRun.objects.filter(schedule=mine).aggregate(last=Max("created_at"))["last"]
        runs_created = (created - fired_at).total_seconds()
        single_downloads = [fire_timed(s.pk, "download") for s in theirs]

        wait_until(update_at)
        cluster_update = fire_timed(mine.pk, "update")
        single_updates = [fire_timed(s.pk, "update") for s in theirs]
        looks = sum(r["path"].endswith("timestamp.json") for r in server.behaviour.requests)

    runs = UpdateRun.objects.filter(schedule=mine)
    carried = runs.filter(update_phase_started=True).count()
    download = Timed(median(t.wall for t in single_downloads), median(t.cpu for t in single_downloads))
    update = Timed(median(t.wall for t in single_updates), median(t.cpu for t in single_updates))
    return {
        "name": "fanout",
        "metrics": [
            metric(
                f"{count}-node cluster, download entry: runs created",
                runs.count(),
                "",
                f"= {count}",
                runs.count() == count,
            ),
            metric("the same: fired -> every run created", runs_created * 1000, "ms"),
            metric("the same: fired -> chains published (the call returned)", cluster_download.wall * 1000, "ms"),
            metric(f"baseline: bulk-insert of {count} bare UpdateRun rows, best of 5", baseline.wall * 1000, "ms"),
            metric("fired -> every run created / baseline", runs_created / baseline.wall, "x"),
            metric("fired -> chains published / baseline", cluster_download.wall / baseline.wall, "x"),
            metric("the same in CPU time of this process / baseline's", cluster_download.cpu / baseline.cpu, "x"),
            metric(f"{count}-node cluster, update entry: runs carried on", carried, "", f"= {count}", carried == count),
            metric("the same: fired -> chains published", cluster_update.wall * 1000, "ms"),
            metric("the same / baseline", cluster_update.wall / baseline.wall, "x"),
            metric("a single system's download entry, median", download.wall * 1000, "ms"),
            metric("a single system's download entry, CPU time of this process", download.cpu * 1000, "ms"),
            metric("a single system's update entry (carries its run on), median", update.wall * 1000, "ms"),
            metric("a single system's update entry, CPU time of this process", update.cpu * 1000, "ms"),
            metric("looks at the repository, all firings", looks, "", "= 2", looks == 2),
            metric("model: 500 single systems due at once, on 2 processes", 500 * download.wall / PROCESSES, "s"),
            metric(
                "model: 2,000 single-system update entries at once, on 2 processes", 2000 * update.wall / PROCESSES, "s"
            ),
        ],
        "details": {
            "nodes": count,
            "singles": SINGLES,
            "single_download_ms": sorted(round(t.wall * 1000, 2) for t in single_downloads),
            "single_update_ms": sorted(round(t.wall * 1000, 2) for t in single_updates),
            "download_result": cluster_download.result[:300],
            "update_result": cluster_update.result[:300],
        },
    }
