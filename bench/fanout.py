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
- the 100 single systems' download entries, due at one instant of their own (two
  seconds later): the first one fires them all (updates/scheduled.py: claim), from
  the call to every run created; then the other 99 one after the other, each of which
  only re-arms its entry: ms per firing.
At the update time, the update entries the same way (the cluster's carries 200 runs
into their update phase; the first single system's carries all 100).

Baseline, measured in the same run before the firings: bulk-inserting 200 bare
UpdateRun rows (one transaction, one bulk_create), best of five. The ratio is the
figure to compare between machines; the milliseconds move with the machine.

A model of the fan-outs issue 16 names, from the costs measured here, on 2 control
worker processes and leaving out Celery's own cost per task:
- 500 single systems due in one minute (benchmark 5): every run created after five
  times the first firing of 100 (it grows with the nodes, as the cluster's does), and
  the 499 other firings' re-arming after that, on two processes;
- a fleet-wide update of 10,000 nodes (2,000 clusters of 4, 2,000 single systems):
  at the update time the 2,000 single systems' update entries fire (the clusters'
  fire their load-balancer lead earlier): twenty times the first update firing of 100.
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
APART = timedelta(seconds=2)  # the single systems' instant, after the cluster's
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


def last_created(runs: Any) -> datetime:
    from django.db.models import Max

    return runs.aggregate(last=Max("created_at"))["last"]


def fire_timed(schedule_id: int, kind: str) -> Timed:
    from updates import scheduled

    wall, cpu = time.perf_counter(), time.process_time()
    result = scheduled.fire(schedule_id, kind)
    return Timed(time.perf_counter() - wall, time.process_time() - cpu, result)


def measure(work: Path, count: int) -> dict[str, Any]:
    from django.conf import settings
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
        singles_at = update_at + APART  # an instant of their own
        mine = UpdateSchedule.objects.create(name="cluster", cluster=cluster, run_at=update_at, download_lead=LEAD)
        theirs = [UpdateSchedule.objects.create(name=f"s {n}", node=n, run_at=singles_at, download_lead=LEAD)
                  for n in singles]  # fmt: skip

        wait_until(update_at - LEAD)
        fired_at = timezone.now()
        cluster_download = fire_timed(mine.pk, "download")
        runs_created = (last_created(UpdateRun.objects.filter(schedule=mine)) - fired_at).total_seconds()
        wait_until(singles_at - LEAD)
        fired_at = timezone.now()
        batch_download = fire_timed(theirs[0].pk, "download")
        batch_created = (last_created(UpdateRun.objects.filter(schedule__in=theirs)) - fired_at).total_seconds()
        single_downloads = [fire_timed(s.pk, "download") for s in theirs[1:]]

        wait_until(update_at)
        cluster_update = fire_timed(mine.pk, "update")
        wait_until(singles_at)
        batch_update = fire_timed(theirs[0].pk, "update")
        single_updates = [fire_timed(s.pk, "update") for s in theirs[1:]]
        looks = sum(r["path"].endswith("timestamp.json") for r in server.behaviour.requests)

    runs = UpdateRun.objects.filter(schedule=mine)
    carried = runs.filter(update_phase_started=True).count()
    single_runs = UpdateRun.objects.filter(schedule__in=theirs)
    singles_carried = single_runs.filter(update_phase_started=True).count()
    download = Timed(median(t.wall for t in single_downloads), median(t.cpu for t in single_downloads))
    update = Timed(median(t.wall for t in single_updates), median(t.cpu for t in single_updates))
    fired_already = sum("fired already" in t.result for t in single_downloads + single_updates)
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
            metric(
                f"{SINGLES} single systems due at one instant, the first download entry: runs created",
                single_runs.count(),
                "",
                f"= {SINGLES}",
                single_runs.count() == SINGLES,
            ),
            metric("the same: fired -> every run created", batch_created * 1000, "ms"),
            metric("the same: fired -> chains published (the call returned)", batch_download.wall * 1000, "ms"),
            metric(f"the other {SINGLES - 1} download entries: only re-arm, median", download.wall * 1000, "ms"),
            metric("the same, CPU time of this process", download.cpu * 1000, "ms"),
            metric(
                f"the first update entry of the {SINGLES}: runs carried on",
                singles_carried,
                "",
                f"= {SINGLES}",
                singles_carried == SINGLES,
            ),
            metric("the same: fired -> chains published", batch_update.wall * 1000, "ms"),
            metric(f"the other {SINGLES - 1} update entries: only re-arm, median", update.wall * 1000, "ms"),
            metric(
                "the other entries found their firing done",
                fired_already,
                "",
                f"= {2 * (SINGLES - 1)}",
                fired_already == 2 * (SINGLES - 1),
            ),
            metric("looks at the repository, all firings", looks, "", "= 4", looks == 4),
            metric("model: 500 single systems due at once, every run created", 5 * batch_created, "s"),
            metric(
                "model: the same, the 499 other entries re-armed after that, on 2 processes",
                5 * batch_download.wall + 499 * download.wall / PROCESSES,
                "s",
            ),
            metric("model: 2,000 single-system update entries at once, all carried on", 20 * batch_update.wall, "s"),
        ],
        "details": {
            "nodes": count,
            "singles": SINGLES,
            "batch_download_result": batch_download.result[:300],
            "single_download_ms": sorted(round(t.wall * 1000, 2) for t in single_downloads),
            "single_update_ms": sorted(round(t.wall * 1000, 2) for t in single_updates),
            "download_result": cluster_download.result[:300],
            "update_result": cluster_update.result[:300],
        },
    }
