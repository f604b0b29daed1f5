"""The fleet at a glance: the admin's home page (tgpadmin/sites.py, admin/fleet_index.html).

`compute()` reads everything with aggregates, a fixed number of queries however many
nodes, runs and steps there are, plus one Redis round trip for the clusters' slot use
(the one /metrics makes). Node counts come from the queries /metrics runs
(updates/metrics.py), so the page and Prometheus never disagree.

Every count carries the URL of the admin list that shows exactly those nodes or runs.
Where no filter of the node list said it, StateFilter (nodes/admin.py) applies the
conditions below: the page and the list share one definition, not two copies.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Count, Exists, OuterRef, Q, QuerySet, TextChoices
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode

from agent.shared.protocol import version_key
from nodes.models import Channel, Cluster, Node
from updates.metrics import NodeGroup, node_groups, read_broker, silent_before
from updates.models import UpdateLock, UpdateRun, UpdateSchedule, UpdateStep
from updates.nagios import newest_by_channel
from updates.schedules import NEVER, armed_at, update_entry_lead

log = logging.getLogger(__name__)

NEXT_UPDATES = 8
LATEST_RUNS = 8
RUN_WINDOW = timedelta(hours=24)


class NodeState(TextChoices):
    """The node list's "state" filter: the overview's states that no other filter of
    the list (status, maintenance mode, channel, installed version) covers."""

    CURRENT = "current", "up to date"
    BEHIND = "behind", "behind its channel"
    WAITING_SLOT = "waiting_slot", "waiting for a cluster slot"
    LOCKED = "locked", "locked"
    DOWNLOAD_WARNING = "download_warning", "download warning"
    SILENT = "silent", "silent"


# --- what a node's state means: shared by the overview and the node list's filter ----


def _version(text: str) -> tuple[int, ...] | None:
    try:
        return version_key(text)
    except ValueError:
        return None


def newest_first(versions: Iterable[str]) -> list[str]:
    """Versions in their order (2.10.0 before 2.9.0), newest first; what is not one last."""
    return sorted(set(versions), key=lambda v: (_version(v) is not None, _version(v) or (), v), reverse=True)


def is_behind(version: str, newest: str | None) -> bool:
    """Older than the newest release of its channel. A version that is not one (nothing
    reported) or a channel without a release is neither behind nor up to date."""
    mine, top = _version(version), _version(newest or "")
    return mine is not None and top is not None and mine < top


def is_current(version: str, newest: str | None) -> bool:
    return bool(version) and version == newest


def newest_versions() -> dict[str, str | None]:
    """Channel -> the version of its newest release the repository still lists."""
    return {channel: r.version if r else None for channel, r in newest_by_channel(Channel.values).items()}


def version_condition(state: str, newest: dict[str, str | None], installed: Iterable[tuple[str, str]]) -> Q:
    """Nodes up to date or behind, as a condition on (channel, installed version): the
    versions are compared in Python (a version's order is not its text's), over the
    few distinct pairs the fleet has, never over its nodes."""
    test = is_behind if state == NodeState.BEHIND else is_current
    by_channel: dict[str, list[str]] = {}
    for channel, version in set(installed):
        if test(version, newest.get(channel)):
            by_channel.setdefault(channel, []).append(version)
    condition = Q(pk__in=[])  # nothing
    for channel, versions in by_channel.items():
        condition |= Q(channel=channel, installed_version__in=sorted(versions))
    return condition


def flag_conditions(now: datetime) -> dict[str, Q]:
    """The states a node's own row (and its lock or its run) says, as conditions."""
    active_lock = UpdateLock.objects.active().filter(node=OuterRef("pk"))
    in_line = UpdateStep.objects.waiting(UpdateStep.Name.SLOT).filter(run__node=OuterRef("pk"))
    return {
        NodeState.WAITING_SLOT: Q(Exists(in_line)),
        NodeState.LOCKED: Q(Exists(active_lock)),
        NodeState.DOWNLOAD_WARNING: Q(download_warning=True),
        NodeState.SILENT: Q(last_seen__lt=silent_before(now)),
    }


def nodes_in_state(nodes: QuerySet[Node], state: str, now: datetime) -> QuerySet[Node]:
    """The node list's filter: the nodes the overview counts in `state`."""
    if state in (NodeState.CURRENT, NodeState.BEHIND):
        installed = Node.objects.exclude(installed_version="").values_list("channel", "installed_version")
        return nodes.filter(version_condition(state, newest_versions(), installed.distinct().order_by()))
    return nodes.filter(flag_conditions(now)[state])


# --- what the page shows ------------------------------------------------------------------


def _url(name: str, *args: object, **query: str | int) -> str:
    url = reverse(name, args=args)
    return f"{url}?{urlencode(query)}" if query else url


def _nodes_url(**query: str | int) -> str:
    return _url("admin:nodes_node_changelist", **query)


@dataclass(frozen=True)
class Tile:
    """A count and the list of exactly what it counts; `alert`: the operator should look."""

    label: str
    count: int
    url: str
    alert: bool = False
    parts: tuple[Tile, ...] = ()


@dataclass(frozen=True)
class VersionCount:
    version: str
    count: int
    url: str
    newest_of: tuple[str, ...] = ()  # the channels whose newest release it is


@dataclass(frozen=True)
class ClusterUse:
    cluster: Cluster
    nodes: int
    slots_used: int | None  # None: the broker did not answer
    places_used: int | None

    @property
    def url(self) -> str:
        return _url("admin:nodes_cluster_change", self.cluster.pk)

    @property
    def nodes_url(self) -> str:
        return _nodes_url(cluster__id__exact=self.cluster.pk)

    @property
    def slots(self) -> str:
        return f"{_used(self.slots_used)} / {self.cluster.max_parallel_updates}"

    @property
    def places(self) -> str:
        return f"{_used(self.places_used)} / {self.cluster.out_of_lb_bound}"


def _used(count: int | None) -> str:
    return "unknown" if count is None else str(count)


@dataclass(frozen=True)
class Occurrence:
    at: datetime
    schedule: UpdateSchedule

    @property
    def target(self) -> str:
        return f"cluster {self.schedule.cluster}" if self.schedule.cluster_id else str(self.schedule.node)

    @property
    def url(self) -> str:
        """The schedule's page, at its plan (a cluster's; a single system has none)."""
        url = _url("admin:updates_updateschedule_change", self.schedule.pk)
        return f"{url}#plan-{self.schedule.pk}-section" if self.schedule.cluster_id else url


@dataclass(frozen=True)
class Runs:
    since: datetime
    total: Tile
    by_state: tuple[Tile, ...]
    latest: tuple[UpdateRun, ...]


@dataclass(frozen=True)
class Overview:
    now: datetime
    nodes: Tile
    states: tuple[Tile, ...]
    versions: tuple[VersionCount, ...]
    clusters: tuple[ClusterUse, ...]
    broker_up: bool
    next_updates: tuple[Occurrence, ...]
    runs: Runs

    def state(self, label: str) -> Tile:
        return next(tile for tile in self.states if tile.label == label)


def compute(now: datetime | None = None) -> Overview:
    now = now or timezone.now()
    groups = node_groups()
    newest = newest_versions()
    clusters, broker_up = cluster_use()
    return Overview(
        now=now,
        nodes=Tile("nodes", sum(g.nodes for g in groups), _nodes_url()),
        states=node_states(now, groups, newest),
        versions=versions(groups, newest),
        clusters=clusters,
        broker_up=broker_up,
        next_updates=next_updates(now),
        runs=recent_runs(now),
    )


def node_states(now: datetime, groups: list[NodeGroup], newest: dict[str, str | None]) -> tuple[Tile, ...]:
    """Up to date and behind from the (status, version, channel) groups, updating and
    never reported from their status; the rest in one aggregate over the nodes."""
    flags = flag_conditions(now)
    counted = Node.objects.aggregate(
        maintenance=Count("pk", filter=Q(maintenance_mode=True)),
        **{state: Count("pk", filter=condition) for state, condition in flags.items()},
    )
    status, behind = Counter[str](), Counter[str]()
    for group in groups:
        status[group.status] += group.nodes
        if is_behind(group.version, newest.get(group.channel)):
            behind[group.channel] += group.nodes
    current = sum(g.nodes for g in groups if is_current(g.version, newest.get(g.channel)))

    def state(value: NodeState, count: int, alert: bool = False) -> Tile:
        return Tile(value.label, count, _nodes_url(state=value), alert and count > 0)

    per_channel = tuple(
        Tile(channel, behind[channel], _nodes_url(state=NodeState.BEHIND, channel__exact=channel))
        for channel in Channel.values
        if behind[channel]
    )
    return (
        state(NodeState.CURRENT, current),
        Tile(NodeState.BEHIND.label, sum(behind.values()), _nodes_url(state=NodeState.BEHIND), False, per_channel),
        Tile("updating", status[Node.Status.UPDATING], _nodes_url(status=Node.Status.UPDATING)),
        state(NodeState.WAITING_SLOT, counted[NodeState.WAITING_SLOT]),
        Tile("in maintenance mode", counted["maintenance"], _nodes_url(maintenance_mode__exact=1)),
        state(NodeState.LOCKED, counted[NodeState.LOCKED], alert=True),
        state(NodeState.DOWNLOAD_WARNING, counted[NodeState.DOWNLOAD_WARNING], alert=True),
        state(NodeState.SILENT, counted[NodeState.SILENT], alert=True),
        Tile("never reported", status[Node.Status.NEVER_REPORTED], _nodes_url(status=Node.Status.NEVER_REPORTED)),
    )


def versions(groups: list[NodeGroup], newest: dict[str, str | None]) -> tuple[VersionCount, ...]:
    """Version -> nodes, newest first; nodes that reported none last."""
    counts = Counter[str]()
    for group in groups:
        counts[group.version] += group.nodes
    order = newest_first(counts)
    newest_of = {version: tuple(c for c in Channel.values if newest.get(c) == version) for version in order}
    return tuple(
        VersionCount(version, counts[version], _nodes_url(installed_version=version), newest_of[version])
        for version in order
    )


def cluster_use() -> tuple[tuple[ClusterUse, ...], bool]:
    """Each cluster with its update slots and places out of the load balancer in use,
    read from Redis in one round trip; without an answer "unknown", and the page stands."""
    clusters = list(Cluster.objects.annotate(node_count=Count("nodes")).order_by("name"))
    found = read_broker([c.name for c in clusters]) if clusters else None
    held = found.held if found is not None else {}
    unknown = (None, None)
    uses = tuple(ClusterUse(c, c.node_count, *held.get(c.name, unknown)) for c in clusters)  # type: ignore[attr-defined]
    return uses, found is not None or not clusters


def next_updates(now: datetime, count: int = NEXT_UPDATES) -> tuple[Occurrence, ...]:
    """The next update of each schedule under time control, the `count` soonest. Read
    from the update entries as armed (every firing arms its entry for the next one):
    one query, where computing each schedule's window took 0.3 s at 2,000 schedules.
    The entry of a cluster schedule fires its load-balancer lead before the update
    time; the few rows read are ordered by the update time itself."""
    armed = "update_task__clocked__clocked_time"
    schedules = (
        UpdateSchedule.objects.filter(time_control=True, download_only=False, update_task__enabled=True)
        .filter(**{f"{armed}__gt": NEVER})  # NEVER: armed for no firing
        .select_related("node", "cluster", "update_task__clocked")
        .order_by(armed)
    )
    # An entry armed in the past is overdue (beat down): shown, it says so by its time.
    found = [Occurrence(at + update_entry_lead(s), s) for s in schedules[:count] if (at := armed_at(s.update_task))]
    return tuple(sorted(found, key=lambda o: o.at))


def recent_runs(now: datetime) -> Runs:
    """The runs started in the last RUN_WINDOW: counts by state and the latest few.
    A count per state, not a GROUP BY state: grouped, SQLite walked the index on
    (state, last_activity_at) through every run ever made (24 ms at 200,000) instead
    of the window's few on the index on created_at."""
    since = now - RUN_WINDOW
    recent = UpdateRun.objects.filter(created_at__gte=since)
    counts = recent.aggregate(**{state: Count("pk", filter=Q(state=state)) for state in UpdateRun.State.values})

    def runs_url(**query: str) -> str:
        # The instant itself, not "24 hours": the list shows what was counted here.
        return _url("admin:updates_updaterun_changelist", created_at__gte=since.isoformat(), **query)

    failed = UpdateRun.State.FAILED
    by_state = tuple(
        Tile(label, counts[value], runs_url(state__exact=value), value == failed and counts[value] > 0)
        for value, label in UpdateRun.State.choices
    )
    latest = tuple(recent.select_related("node", "release").order_by("-created_at")[:LATEST_RUNS])
    return Runs(since, Tile("runs", sum(counts.values()), runs_url()), by_state, latest)
