"""Prometheus metrics of the fleet and its updates, served at /metrics (updates/metrics_view.py).

Everything is read when Prometheus scrapes: aggregates from the database, and the
control queue and the cluster slots from Redis. Nothing is counted in this process's
memory, so the numbers survive restarts and are the same whichever web process
answers. A scrape costs a fixed number of queries (GROUP BY and conditional counts),
however many nodes, runs and steps there are, plus one Redis round trip.

The collector is registered on a registry of its own, not prometheus_client's global
one: that one would add this process's Python and GC metrics, which say nothing about
the fleet and differ between the web processes behind one URL.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import redis
from django.conf import settings
from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, QuerySet, Sum, Value
from django.db.models.fields import DateTimeField
from django.utils import timezone
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString
from redis.backoff import NoBackoff
from redis.retry import Retry

from agent.shared.protocol import CONTROL_QUEUE, HEARTBEATS, OUT_PREFIX, SLOT_PREFIX, slot_keys
from agent.shared.sentinel import Sentinel, redis_client
from nodes.models import Cluster, Node
from tgpadmin.broker_acl import queue_keys
from updates.models import UpdateLock, UpdateRun, UpdateStep

log = logging.getLogger(__name__)

PREFIX = "tgpadmin"
# Step durations are read over this window: bounded work per scrape (an index on
# finished_at), and recent enough to show today's behaviour, not last year's.
STEP_WINDOW = timedelta(hours=24)
# From a notice (a second) to a download or a wait for a slot (up to an hour and more: +Inf).
STEP_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
# Heartbeat ages only mean something against the interval: buckets at these multiples of it.
HEARTBEAT_MULTIPLES = (1, 2, 3, 5, 10, 20, 60, 240)
SILENT_AFTER_INTERVALS = 3
# A broker that hangs must not hang the scrape: it answers within this or counts as down.
REDIS_TIMEOUT = 2.0
# Only steps that ran: a skipped step has no duration worth counting (its start is its end).
TIMED_STEP_STATES = (UpdateStep.State.SUCCEEDED, UpdateStep.State.FAILED)


class FleetCollector(Collector):
    """Every metric, computed afresh at each scrape (a fixed number of queries)."""

    def collect(self) -> Iterator[Metric]:
        now = timezone.now()
        yield nodes_by_state()
        yield from flags()
        yield from run_counters()
        yield step_durations(now)
        yield from heartbeats(now)
        yield from broker_and_slots()


@functools.cache
def registry() -> CollectorRegistry:
    """The registry /metrics renders: only the fleet's collector. auto_describe=False:
    registering must not run the queries (it would, to learn the metric names)."""
    fleet = CollectorRegistry(auto_describe=False)
    fleet.register(FleetCollector())
    return fleet


def _name(name: str) -> str:
    return f"{PREFIX}_{name}"


def _seconds(value: timedelta | None) -> float:
    return value.total_seconds() if value is not None else 0.0


# --- nodes --------------------------------------------------------------------------


class NodeGroup(NamedTuple):
    status: str
    version: str
    channel: str
    nodes: int


def node_groups() -> list[NodeGroup]:
    """Node.status as the admin derives it (NodeQuerySet.in_status, the list filter's):
    one query per state, grouped by version and channel. The admin's overview
    (updates/overview.py) counts from the same rows."""
    groups = []
    for state in Node.Status.values:
        rows = Node.objects.in_status(state).values("installed_version", "channel").annotate(n=Count("pk"))
        groups += [NodeGroup(state, row["installed_version"], row["channel"], row["n"]) for row in rows.order_by()]
    return groups


def nodes_by_state() -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        _name("nodes"),
        "Nodes by state (never_reported, updating, online: Node.status), installed version and channel.",
        labels=["state", "version", "channel"],
    )
    for group in node_groups():
        family.add_metric([group.status, group.version, group.channel], group.nodes)
    return family


def flags() -> Iterator[GaugeMetricFamily]:
    yield GaugeMetricFamily(
        _name("update_locks"),
        "Active update locks: nodes on which no update starts until a member of update removes the lock.",
        value=UpdateLock.objects.active().count(),
    )
    yield GaugeMetricFamily(
        _name("download_warnings"),
        'Nodes whose warning flag is set ("Update download error"): cleared by the next verified download.',
        value=Node.objects.filter(download_warning=True).count(),
    )


def silent_before(now: datetime) -> datetime:
    """Reported nodes last seen before this are silent (the admin's overview and its
    node filter count them so too)."""
    interval = settings.TGP_HEARTBEAT_INTERVAL
    return now - timedelta(seconds=SILENT_AFTER_INTERVALS * interval + settings.TGP_SEEN_RESOLUTION)


def heartbeats(now: datetime) -> Iterator[Metric]:
    """How long ago each reported node was last seen, as a distribution (a gauge
    histogram: the fleet now, not events), and how many are silent. last_seen may lag
    a heartbeat by TGP_SEEN_RESOLUTION (heartbeats that change nothing are written at
    most that often), so silence is counted beyond it."""
    interval = settings.TGP_HEARTBEAT_INTERVAL
    edges = [m * interval for m in HEARTBEAT_MULTIPLES]
    age = ExpressionWrapper(Value(now, output_field=DateTimeField()) - F("last_seen"), output_field=DurationField())
    found = Node.objects.filter(last_seen__isnull=False).aggregate(
        count=Count("pk"),
        total=Sum(age),
        silent=Count("pk", filter=Q(last_seen__lt=silent_before(now))),
        **{f"le{i}": Count("pk", filter=Q(last_seen__gte=now - timedelta(seconds=e))) for i, e in enumerate(edges)},
    )
    histogram = GaugeHistogramMetricFamily(
        _name("node_heartbeat_age_seconds"),
        "Time since each reported node was last seen (now - Node.last_seen); never-reported nodes are left out.",
    )
    buckets = [(floatToGoString(e), found[f"le{i}"]) for i, e in enumerate(edges)]
    histogram.add_metric([], [*buckets, ("+Inf", found["count"])], _seconds(found["total"]))
    yield histogram
    yield GaugeMetricFamily(
        _name("nodes_silent"),
        f"Reported nodes not seen for more than {SILENT_AFTER_INTERVALS} heartbeat intervals "
        "(plus the last_seen resolution).",
        value=found["silent"],
    )
    yield GaugeMetricFamily(
        _name("heartbeat_interval_seconds"),
        "The agents' heartbeat interval this control plane assumes (TGP_HEARTBEAT_INTERVAL).",
        value=interval,
    )


# --- runs and steps -----------------------------------------------------------------


def run_counters() -> Iterator[Metric]:
    """Counters from the UpdateRun rows (one GROUP BY): a run is counted once it exists,
    and again once it ends. Rows are history and never deleted; were they, the counter
    would fall and Prometheus would take it for a reset."""
    rows = UpdateRun.objects.values("trigger", "state").annotate(n=Count("pk")).order_by()
    counts = {(row["trigger"], row["state"]): row["n"] for row in rows}
    # Every trigger, with 0 where no run has it yet: a series that appears late breaks rate().
    triggers = list(dict.fromkeys([*UpdateRun.Trigger.values, *(t for t, _ in counts)]))

    def total(trigger: str, states: Iterable[str]) -> int:
        return sum(counts.get((trigger, state), 0) for state in states)

    State = UpdateRun.State
    for name, what, states in (
        ("started", "Update runs started", State.values),
        ("succeeded", "Update runs that succeeded", [State.SUCCEEDED]),
        ("failed", "Update runs that failed", [State.FAILED]),
        ("cancelled", "Update runs cancelled before anything disruptive", [State.CANCELLED]),
    ):
        counter = CounterMetricFamily(_name(f"update_runs_{name}"), f"{what}, by trigger.", labels=["trigger"])
        for trigger in triggers:
            counter.add_metric([trigger], total(trigger, states))
        yield counter
    running = GaugeMetricFamily(_name("update_runs_running"), "Update runs under way, by trigger.", labels=["trigger"])
    for trigger in triggers:
        running.add_metric([trigger], total(trigger, [State.RUNNING]))
    yield running


def _timed_steps(now: datetime) -> QuerySet[UpdateStep]:
    duration = ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField())
    recent = UpdateStep.objects.filter(
        finished_at__gte=now - STEP_WINDOW, started_at__isnull=False, state__in=TIMED_STEP_STATES
    )
    return recent.annotate(duration=duration)


def step_durations(now: datetime) -> GaugeHistogramMetricFamily:
    """Durations of the steps that ended in the last STEP_WINDOW, by step: a gauge
    histogram (steps leave the window as they age, so its buckets are no counters:
    use histogram_quantile on the buckets as they are, without rate())."""
    limits: dict[str, Any] = {
        f"le{i}": Count("pk", filter=Q(duration__lte=timedelta(seconds=b))) for i, b in enumerate(STEP_BUCKETS)
    }
    rows = _timed_steps(now).values("name").annotate(count=Count("pk"), total=Sum("duration"), **limits)
    by_name = {row["name"]: row for row in rows.order_by()}
    family = GaugeHistogramMetricFamily(
        _name("update_step_duration_seconds"),
        f"Duration of update steps that succeeded or failed in the last {STEP_WINDOW.total_seconds():g} s, by step.",
        labels=["step"],
    )
    for step in UpdateStep.Name.values:
        row = by_name.get(step, {"count": 0, "total": None} | dict.fromkeys(limits, 0))
        buckets = [(floatToGoString(b), row[f"le{i}"]) for i, b in enumerate(STEP_BUCKETS)]
        family.add_metric([step], [*buckets, ("+Inf", row["count"])], _seconds(row["total"]))
    return family


# --- Redis: the control queue and the cluster slots ----------------------------------


@functools.cache
def _client(url: str, sentinel: Sentinel | None) -> redis.Redis:
    """A client of its own on the web's broker URL (the `web` broker user may LLEN the
    control queue and HLEN the slots; Sentinels as its other clients ask them), with
    timeouts the shared ones lack and no retries: the next scrape is the retry."""
    return redis_client(
        url, sentinel, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT, retry=Retry(NoBackoff(), 0)
    )


@dataclass(frozen=True)
class BrokerReading:
    queued: int  # messages in the control queue (all its priority lists)
    heartbeats: int  # heartbeats not yet taken by `manage.py heartbeats`
    held: dict[str, tuple[int, int]]  # cluster -> (update slots held, places out of the load balancer held)


def _read_redis(clusters: list[str]) -> BrokerReading:
    """The control queue's length (its lists, one per priority), the heartbeats waiting, and
    each cluster's held update slots and places out of the load balancer, in one round trip."""
    lists = queue_keys(CONTROL_QUEUE, literal=False)
    pipe = _client(settings.REDIS_URL, settings.REDIS_SENTINEL).pipeline(transaction=False)
    for key in lists:
        pipe.llen(key)
    pipe.llen(HEARTBEATS)
    for cluster in clusters:
        pipe.hlen(slot_keys(cluster, SLOT_PREFIX)[0])
        pipe.hlen(slot_keys(cluster, OUT_PREFIX)[0])
    answers = pipe.execute()
    held = answers[len(lists) + 1 :]
    return BrokerReading(
        queued=sum(answers[: len(lists)]),
        heartbeats=answers[len(lists)],
        held={c: (held[2 * i], held[2 * i + 1]) for i, c in enumerate(clusters)},
    )


def read_broker(clusters: list[str]) -> BrokerReading | None:
    """_read_redis, or None if the broker did not answer (within REDIS_TIMEOUT): the
    caller shows what it has without it (the admin's overview: "unknown")."""
    try:
        return _read_redis(clusters)
    except (redis.RedisError, OSError) as exc:
        # The class only: a connection error's text may carry the host, never the URL's password.
        log.warning("the broker did not answer (%s): queue and slot use unknown", type(exc).__name__)
        return None


def broker_and_slots() -> Iterator[GaugeMetricFamily]:
    """Slots are per cluster: the cap they count against is the cluster's own, so a sum
    over clusters would say nothing. Clusters are few (each is many nodes), so the
    label stays small. Without Redis the caps are still known, the use is not."""
    clusters = list(Cluster.objects.order_by("name"))
    reading = read_broker([c.name for c in clusters])
    yield GaugeMetricFamily(
        _name("broker_up"), "1 if the broker (Redis) answered this scrape, else 0.", value=int(reading is not None)
    )
    if reading is not None:
        yield GaugeMetricFamily(
            _name("control_queue_messages"),
            "Messages waiting in the control queue (all its priority lists; taken but unacknowledged ones not).",
            value=reading.queued,
        )
        yield GaugeMetricFamily(
            _name("heartbeats_waiting"),
            "Node heartbeats not yet taken off the broker by manage.py heartbeats (grows if none runs).",
            value=reading.heartbeats,
        )
    yield from _cluster_gauges(clusters, reading.held if reading is not None else None)


def _cluster_gauges(clusters: list[Cluster], held: dict[str, tuple[int, int]] | None) -> Iterator[GaugeMetricFamily]:
    families = {
        "slots": GaugeMetricFamily(
            _name("cluster_update_slots"), "Update slots of the cluster (max parallel updates).", labels=["cluster"]
        ),
        "places": GaugeMetricFamily(
            _name("cluster_out_of_lb_places"),
            "Places out of the load balancer of the cluster (max out of load balancer).",
            labels=["cluster"],
        ),
    }
    used = {
        "slots": GaugeMetricFamily(
            _name("cluster_update_slots_in_use"), "Update slots held (nodes updating).", labels=["cluster"]
        ),
        "places": GaugeMetricFamily(
            _name("cluster_out_of_lb_places_in_use"), "Places out of the load balancer held.", labels=["cluster"]
        ),
    }
    for cluster in clusters:
        families["slots"].add_metric([cluster.name], cluster.max_parallel_updates)
        families["places"].add_metric([cluster.name], cluster.out_of_lb_bound)
        if held is not None:
            used["slots"].add_metric([cluster.name], held[cluster.name][0])
            used["places"].add_metric([cluster.name], held[cluster.name][1])
    yield from families.values()
    if held is not None:
        yield from used.values()
