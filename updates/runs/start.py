"""Starting runs: may an update start, which steps does it get, and the start itself
(the runs, their steps, maintenance mode, and their chains queued at commit)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction

from agent.shared.protocol import WHEN
from nodes.models import Node, NodeKey
from updates.models import Release, UpdateLock, UpdateRun, UpdateStep
from updates.plans import attach_entries
from updates.runs.chains import queue_started, waiting
from updates.runs.rollouts import group

log = logging.getLogger(__name__)


class UpdateRefused(Exception):
    """The update cannot start; the message says why, for the operator."""


class AlreadyStarted(UpdateRefused):
    """The node has its run for this update time already (a second beat, a firing
    twice): a schedule never starts a second one."""


def default_message(release: Release) -> str:
    return (
        f"This server is being updated to version {release.version}. Please save your work: "
        f"you will be logged off {WHEN} and can log on again after the update."
    )


@dataclass(frozen=True)
class StartChecks:
    """What deciding whether an update may start needs, read for many nodes at once:
    three queries or so however many nodes, so that confirming and starting an
    Auto-Update of a whole cluster costs no query per node."""

    locks: dict[int, str]  # node id -> the reason of its active update lock
    busy: frozenset[int]  # ids of nodes with a running run
    downloading: dict[int, int]  # node id -> its running download-only run
    newest: dict[str, Release | None]  # channel -> its newest release
    trusted: frozenset[int]  # ids of nodes with an accepted key (updates.trust)
    # node id -> its run for the update time asked about (read only when there is one)
    started: dict[int, int] = field(default_factory=dict)

    @classmethod
    def read(cls, nodes: Iterable[Node], scheduled_for: datetime | None = None) -> StartChecks:
        nodes = list(nodes)
        ids = [node.pk for node in nodes]
        locks = UpdateLock.objects.active().filter(node_id__in=ids)
        running = list(UpdateRun.objects.running().filter(node_id__in=ids).values_list("node_id", "pk", "trigger"))
        slot = UpdateRun.objects.filter(node_id__in=ids, scheduled_for=scheduled_for) if scheduled_for else None
        return cls(
            locks=dict(locks.values_list("node_id", "reason")),
            busy=frozenset(node_id for node_id, _, _ in running),
            downloading={node_id: pk for node_id, pk, trigger in running if trigger == UpdateRun.Trigger.DOWNLOAD},
            newest={channel: Release.newest(channel) for channel in {node.channel for node in nodes}},
            trusted=frozenset(NodeKey.objects.accepted().filter(node_id__in=ids).values_list("node_id", flat=True)),
            started=dict(slot.values_list("node_id", "pk")) if slot is not None else {},
        )


def _check_packages(release: Release, trigger: str, packages: list[str]) -> None:
    if trigger == UpdateRun.Trigger.CATCHUP_PARTIAL and not packages:
        raise UpdateRefused("Choose at least one package for a partial update.")
    if trigger == UpdateRun.Trigger.CATCHUP_FULL and packages:
        raise UpdateRefused("A full update from Oldstable installs the whole release, not single packages.")
    unknown = set(packages) - set(release.packages.values_list("name", flat=True)) if packages else set()
    if unknown:
        raise UpdateRefused(f"Not in release {release.version}: {', '.join(sorted(unknown))}.")


def check_can_start(
    node: Node, release: Release, trigger: str, packages: list[str] | None = None, checks: StartChecks | None = None
) -> None:
    """UpdateRefused with the reason for the operator, if the update may not start.
    `checks`: read for many nodes at once (StartChecks.read); by default for this one."""
    packages = packages or []
    if release.withdrawn_at is not None:
        raise UpdateRefused(f"The {release.withdrawn_reason}: it is never installed.")
    _check_packages(release, trigger, packages)
    checks = checks or StartChecks.read([node])
    if node.pk in checks.started:
        raise AlreadyStarted(f"{node} has its run for this update time already (run {checks.started[node.pk]}).")
    if node.pk not in checks.trusted:
        raise UpdateRefused(f"{node} has no accepted key: accept the key its agent offers on the node's page first.")
    if node.pk in checks.locks:
        raise UpdateRefused(f"{node} has an update lock ({checks.locks[node.pk]}); remove it first.")
    if node.pk in checks.downloading:
        raise UpdateRefused(
            f"{node} is downloading the update files (scheduled download, run {checks.downloading[node.pk]}): "
            "try again when it has finished, in a few minutes."
        )
    if node.pk in checks.busy:
        raise UpdateRefused(f"{node} is already updating.")
    catchup = trigger in (UpdateRun.Trigger.CATCHUP_FULL, UpdateRun.Trigger.CATCHUP_PARTIAL)
    if catchup:
        if release.channel != Release.Channel.OLDSTABLE:
            raise UpdateRefused(f"A catch-up installs an oldstable release; {release.version} is {release.channel}.")
        return
    if packages:
        raise UpdateRefused("Only a partial update from Oldstable installs single packages.")
    newest = checks.newest.get(node.channel)
    if newest is None or release.version_sort < newest.version_sort:
        raise UpdateRefused(
            f"{release.version} is older than the newest {node.channel} release; "
            "only a catch-up from Oldstable may install an older release."
        )
    if node.installed_version == release.version:
        raise UpdateRefused(f"{node} already runs {release.version}: no updates available.")


def plan_steps(node: Node, trigger: str, *, reboot: bool = True) -> list[str]:
    """The steps of a run, in order. Every run downloads (and verifies) its files
    before anything disruptive: a download that fails (a bad index signature, a
    package that does not match, the repository down) fails the run before any
    user is logged off. A scheduled run downloads ahead of its update time. A
    cluster node downloads, then takes an update slot before anything
    disruptive. On the scheduled path (its plan entry's times) it first takes a place
    out of the load balancer at its own time less the lead, leaves the load balancer,
    and holds its users until its planned time; only then does it take an update
    slot and log them off. A release that needs no reboot (`reboot=False`) gets no
    reboot step: one hand-off less while the node is out of service. A download-only
    run (trigger `download`) only downloads."""
    if trigger == UpdateRun.Trigger.DOWNLOAD:
        return ["download"]
    if node.cluster_id is None:
        # Auto-Update, catch-up and scheduled alike: users keep working while it downloads.
        steps = ["notify", "download", "drain", "install", "reboot", "verify", "resume"]
    # A cluster node downloads while it waits for its slot: its users keep working
    # meanwhile, and the slot (a node out of service) is held only for the update itself.
    elif trigger == UpdateRun.Trigger.SCHEDULED:
        steps = [
            "notify", "download", "leave", "exclude", "hold", "slot", "drain", "install", "reboot", "verify", "resume"
        ]  # fmt: skip
    else:
        steps = ["notify", "download", "slot", "drain", "install", "reboot", "verify", "resume"]
    return steps if reboot else [name for name in steps if name != "reboot"]


def start_update(
    node: Node,
    release: Release,
    *,
    user: Any = None,
    trigger: str = UpdateRun.Trigger.MANUAL,
    packages: list[str] | None = None,
    message: str = "",
    schedule: Any = None,
    scheduled_for: datetime | None = None,
) -> UpdateRun:
    """Create the run and its steps, switch the node into maintenance, and queue
    the chain once the transaction has committed. UpdateRefused with the reason."""
    try:
        (outcome,) = _start(
            [(node, release)], user=user, trigger=trigger, packages=sorted(packages or []), message=message,
            schedules=[schedule], scheduled_for=scheduled_for,
        )  # fmt: skip
    except IntegrityError:
        raise UpdateRefused(f"{node} is already updating.") from None
    if isinstance(outcome, UpdateRefused):
        raise outcome
    return outcome


def start_updates(targets: Sequence[tuple[Node, Release]], *, user: Any = None) -> tuple[list[UpdateRun], list[str]]:
    """The operator's Auto-Update of many nodes at once (a whole cluster, say): the
    runs of the nodes that may update, and the reasons for the ones that may not.
    One transaction and a fixed number of queries, however many nodes."""
    try:
        outcomes = _start(targets, user=user, trigger=UpdateRun.Trigger.MANUAL)
    except IntegrityError:
        if len(targets) == 1:
            return [], [f"{targets[0][0]} is already updating."]
        return [], ["Nothing was started: another start came first for one of these nodes. Try again."]
    return [o for o in outcomes if isinstance(o, UpdateRun)], [str(o) for o in outcomes if isinstance(o, UpdateRefused)]


def start_scheduled(
    targets: Sequence[tuple[Node, Release, Any]], *, trigger: str, scheduled_for: datetime | None = None
) -> list[UpdateRun | UpdateRefused]:
    """Firings start the runs of their nodes (a whole cluster; every schedule due at
    the same instant) at once: one transaction and a fixed number of queries however
    many nodes, where a start per node cost some twenty. Each target is a node, its
    release and the schedule it is started by. For each target, in order, its run or
    why it did not start; a node that has its run for `scheduled_for` already is
    refused with AlreadyStarted (read under the nodes' locks: a second beat firing the
    same entry at the same moment waits for the first one's commit, then finds its runs)."""
    pairs = [(node, release) for node, release, _ in targets]
    schedules = [schedule for _, _, schedule in targets]
    try:
        return _start(pairs, user=None, trigger=trigger, schedules=schedules, scheduled_for=scheduled_for)
    except IntegrityError:
        # A start that locked other nodes first came between (cannot happen while every
        # start goes through _start): node by node then, each with its own answer.
        outcomes: list[UpdateRun | UpdateRefused] = []
        for node, release, schedule in targets:
            try:
                outcomes.append(
                    start_update(node, release, trigger=trigger, schedule=schedule, scheduled_for=scheduled_for)
                )
            except UpdateRefused as exc:
                outcomes.append(exc)
        return outcomes


def _start(
    targets: Sequence[tuple[Node, Release]],
    *,
    user: Any,
    trigger: str,
    packages: list[str] | None = None,
    message: str = "",
    schedules: Sequence[Any] | None = None,
    scheduled_for: datetime | None = None,
) -> list[UpdateRun | UpdateRefused]:
    """For each target, in order, its new run or why it may not start; `schedules`: the
    schedule that starts each target, if any. IntegrityError
    if a partial unique index lost a race with another start: nothing of this start
    was kept."""
    if not targets:
        return []  # no transaction: on SQLite it would take the write lock for nothing
    packages = packages or []
    with transaction.atomic():
        # Locked in id order: two starts of overlapping node sets never deadlock.
        ids = [node.pk for node, _ in targets]
        rows = Node.objects.select_for_update(of=("self",)).select_related("cluster").filter(pk__in=ids)
        locked = {node.pk: node for node in rows.order_by("pk")}
        checks = StartChecks.read(locked.values(), scheduled_for)
        outcomes: list[UpdateRun | UpdateRefused] = []
        for (given, release), schedule in zip(targets, schedules or [None] * len(targets), strict=True):
            node = locked.get(given.pk)
            try:
                if node is None:
                    raise UpdateRefused(f"{given} no longer exists.")
                check_can_start(node, release, trigger, packages, checks)
            except UpdateRefused as exc:
                outcomes.append(exc)
                continue
            checks = replace(checks, busy=checks.busy | {node.pk})  # the same node twice: once
            outcomes.append(
                UpdateRun(
                    node=node, release=release, trigger=trigger, packages=packages,
                    started_by=user if getattr(user, "pk", None) else None,
                    message=message or default_message(release),
                    boot_id_before=node.boot_id, version_before=node.installed_version,
                    schedule=schedule, scheduled_for=scheduled_for,
                )
            )  # fmt: skip
        _create([outcome for outcome in outcomes if isinstance(outcome, UpdateRun)])
    return outcomes


def _create(runs: list[UpdateRun]) -> None:
    """Save new runs (of locked nodes; they start running) with their steps (pending),
    switch their nodes into maintenance (not for a download only: users keep working,
    the manual's download "during productive operation"), and queue their chains once
    the transaction has committed."""
    if not runs:
        return
    attach_entries(runs)  # a firing's cluster runs: their plan entries in one query, not one each
    for run in runs:
        # Started at its update time: this chain carries the whole run.
        run.update_phase_started = run.scheduled_for is not None and not waiting(run)
    # Several nodes, or a cluster schedule's occurrence: one rollout. A batch of firings
    # starts the runs of many schedules: each schedule's runs are a group of their own.
    by_schedule: dict[int | None, list[UpdateRun]] = defaultdict(list)
    for run in runs:
        by_schedule[run.schedule_id].append(run)
    for some in by_schedule.values():
        group(some, some[0].started_by)
    UpdateRun.objects.bulk_create(runs)
    names = {run.pk: plan_steps(run.node, run.trigger, reboot=run.release.needs_reboot) for run in runs}
    UpdateStep.objects.bulk_create(
        UpdateStep(run=run, name=name, position=i) for run in runs for i, name in enumerate(names[run.pk])
    )
    updating = [run for run in runs if run.trigger != UpdateRun.Trigger.DOWNLOAD]
    for run in updating:
        run.node.maintenance_mode = True
        run.node.maintenance_reason = f"Update to {run.release.version} (run {run.pk})"
    for run in runs:
        log.info("run %s started: %s -> %s (%s)", run.pk, run.node, run.release.version, run.trigger)
    Node.objects.bulk_update([run.node for run in updating], ["maintenance_mode", "maintenance_reason"])
    queue_started(runs, names)
