"""The control plane of an update run: plain functions that tasks, admin actions
and management commands all call.

The database rows are the truth about a run. The Celery chain built here only
carries the work: every node step reports back through ``record_step`` and every
transition below is a conditional UPDATE, so a duplicate message changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from celery import chain, signature
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Case, F, IntegerField, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from nodes.models import Cluster, Node
from updates.models import Release, UpdateLock, UpdateRun, UpdateStep
from updates.slots import ClusterSlots, shared_slots

log = logging.getLogger(__name__)

CONTROL_QUEUE = "control"
# Asking for a slot is never urgent: no node is out of service yet. Like the nodes'
# reports (nodes.tasks.REPORT_PRIORITY), it yields to the verify and complete of the
# nodes that are: Redis serves priority 0 (the default) first.
SLOT_PRIORITY = 9
NODE_STEPS = {"notify", "exclude", "drain", "download", "install", "reboot", "resume"}


class UpdateRefused(Exception):
    """The update cannot start; the message says why, for the operator."""


def active_lock(node: Node) -> UpdateLock | None:
    return UpdateLock.objects.active().filter(node=node).first()


def default_message(release: Release) -> str:
    return (
        f"This server is being updated to version {release.version}. Please save your work: "
        "you will be logged off shortly and can log on again after the update."
    )


@dataclass(frozen=True)
class StartChecks:
    """What deciding whether an update may start needs, read for many nodes at once:
    three queries or so however many nodes, so that confirming and starting an
    Auto-Update of a whole cluster costs no query per node."""

    locks: dict[int, str]  # node id -> the reason of its active update lock
    busy: frozenset[int]  # ids of nodes with a running run
    newest: dict[str, Release | None]  # channel -> its newest release

    @classmethod
    def read(cls, nodes: Iterable[Node]) -> StartChecks:
        nodes = list(nodes)
        ids = [node.pk for node in nodes]
        locks = UpdateLock.objects.active().filter(node_id__in=ids)
        running = UpdateRun.objects.running().filter(node_id__in=ids)
        return cls(
            locks=dict(locks.values_list("node_id", "reason")),
            busy=frozenset(running.values_list("node_id", flat=True)),
            newest={channel: Release.newest(channel) for channel in {node.channel for node in nodes}},
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
    _check_packages(release, trigger, packages)
    checks = checks or StartChecks.read([node])
    if node.pk in checks.locks:
        raise UpdateRefused(f"{node} has an update lock ({checks.locks[node.pk]}); remove it first.")
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
    """The steps of a run, in order. A scheduled run downloads ahead of its update
    time. A cluster node downloads, then takes an update slot before anything
    disruptive; on the scheduled path it then leaves the load balancer and holds
    for the cluster's lead time before its users are logged off, so at most `cap`
    nodes are ever out of the load balancer. A release that needs no reboot
    (`reboot=False`) gets no reboot step: one hand-off less while the node is out
    of service."""
    if node.cluster_id is None:
        if trigger == UpdateRun.Trigger.SCHEDULED:
            steps = ["notify", "download", "drain", "install", "reboot", "verify", "resume"]
        else:
            steps = ["notify", "drain", "download", "install", "reboot", "verify", "resume"]
    # A cluster node downloads while it waits for its slot: its users keep working
    # meanwhile, and the slot (a node out of service) is held only for the update itself.
    elif trigger == UpdateRun.Trigger.SCHEDULED:
        steps = ["notify", "download", "slot", "exclude", "hold", "drain", "install", "reboot", "verify", "resume"]
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
    runs, refused = _start(
        [(node, release)], user=user, trigger=trigger, packages=sorted(packages or []), message=message,
        schedule=schedule, scheduled_for=scheduled_for,
    )  # fmt: skip
    if refused:
        raise UpdateRefused(refused[0])
    return runs[0]


def start_updates(targets: Sequence[tuple[Node, Release]], *, user: Any = None) -> tuple[list[UpdateRun], list[str]]:
    """The operator's Auto-Update of many nodes at once (a whole cluster, say): the
    runs of the nodes that may update, and the reasons for the ones that may not.
    One transaction and a fixed number of queries, however many nodes."""
    return _start(targets, user=user, trigger=UpdateRun.Trigger.MANUAL)


def _start(
    targets: Sequence[tuple[Node, Release]],
    *,
    user: Any,
    trigger: str,
    packages: list[str] | None = None,
    message: str = "",
    schedule: Any = None,
    scheduled_for: datetime | None = None,
) -> tuple[list[UpdateRun], list[str]]:
    packages = packages or []
    try:
        with transaction.atomic():
            # Locked in id order: two starts of overlapping node sets never deadlock.
            ids = [node.pk for node, _ in targets]
            rows = Node.objects.select_for_update(of=("self",)).select_related("cluster").filter(pk__in=ids)
            locked = {node.pk: node for node in rows.order_by("pk")}
            checks = StartChecks.read(locked.values())
            runs, refused = [], []
            for given, release in targets:
                node = locked.get(given.pk)
                try:
                    if node is None:
                        raise UpdateRefused(f"{given} no longer exists.")
                    check_can_start(node, release, trigger, packages, checks)
                except UpdateRefused as exc:
                    refused.append(str(exc))
                    continue
                checks = replace(checks, busy=checks.busy | {node.pk})  # the same node twice: once
                runs.append(
                    UpdateRun(
                        node=node, release=release, trigger=trigger, packages=packages,
                        started_by=user if getattr(user, "pk", None) else None,
                        message=message or default_message(release),
                        boot_id_before=node.boot_id, version_before=node.installed_version,
                        schedule=schedule, scheduled_for=scheduled_for,
                    )
                )  # fmt: skip
            _create(runs)
    except IntegrityError:
        # A partial unique index lost a race with another start (or a second beat
        # fired the same slot): nothing of this start was kept.
        if len(targets) == 1:
            return [], [f"{targets[0][0]} is already updating."]
        return [], ["Nothing was started: another start came first for one of these nodes. Try again."]
    return runs, refused


def _create(runs: list[UpdateRun]) -> None:
    """Save new runs (of locked nodes) with their steps, switch their nodes into
    maintenance, and queue their chains once the transaction has committed."""
    if not runs:
        return
    for run in runs:
        # Started at its update time: this chain carries the whole run.
        run.update_phase_started = run.scheduled_for is not None and not waiting(run)
    UpdateRun.objects.bulk_create(runs)
    names = {run.pk: plan_steps(run.node, run.trigger, reboot=run.release.needs_reboot) for run in runs}
    UpdateStep.objects.bulk_create(
        UpdateStep(run=run, name=name, position=i) for run in runs for i, name in enumerate(names[run.pk])
    )
    for run in runs:
        run.node.maintenance_mode = True
        run.node.maintenance_reason = f"Update to {run.release.version} (run {run.pk})"
        log.info("run %s started: %s -> %s (%s)", run.pk, run.node, run.release.version, run.trigger)
    Node.objects.bulk_update([run.node for run in runs], ["maintenance_mode", "maintenance_reason"])
    transaction.on_commit(partial(_dispatch_new, runs, names))


def _dispatch_new(runs: list[UpdateRun], names: dict[int, list[str]]) -> None:
    """Queue the chains of runs just created, from the objects at hand: no query per run."""
    still = set(UpdateRun.objects.running().filter(pk__in=names).values_list("pk", flat=True))
    for run in runs:
        if run.pk in still:
            build_chain(run, names[run.pk][0], names=names[run.pk]).apply_async()
            log.info("run %s dispatched to %s", run.pk, run.node.queue)


def node_payload(run: UpdateRun) -> dict[str, Any]:
    """What a node step needs. Package data is not here on purpose: the agent
    takes sizes and hashes from the signed index, never from a message."""
    cluster = run.node.cluster
    return {
        "run": run.pk,
        "node": run.node.hostname,
        "version": run.release.version,
        "packages": list(run.packages),
        "message": run.message,
        "cluster": cluster.name if cluster else None,
        "fence": run.slot_token,
    }


def segment(run: UpdateRun, from_step: str, names: list[str] | None = None) -> tuple[list[str], bool]:
    """The steps one chain carries from `from_step`, and whether it ends the run.

    A chain stops after the slot step (which queues the rest once it holds a
    slot, with the fencing token in the payload) and, for a scheduled run, after
    the download (the rest starts at the update time). `names`: the run's steps, if known."""
    names = names or step_names(run)
    steps = []
    for name in names[names.index(from_step) :]:
        steps.append(name)
        if name == "slot" or (name == "download" and run.trigger == UpdateRun.Trigger.SCHEDULED and waiting(run)):
            return steps, False
    return steps, True


def update_phase_at(run: UpdateRun) -> datetime | None:
    """When a scheduled run's update phase begins: the update time, or for a
    cluster node the load-balancer lead time before it."""
    if run.scheduled_for is None:
        return None
    cluster = run.node.cluster
    return run.scheduled_for - (cluster.lb_lead_time if cluster else timedelta(0))


def waiting(run: UpdateRun) -> bool:
    """A scheduled run before its update phase: downloaded (or trying to), nothing disruptive yet."""
    start = update_phase_at(run)
    return bool(start and timezone.now() < start)


def build_chain(run: UpdateRun, from_step: str, names: list[str] | None = None) -> Any:
    payload = node_payload(run)
    steps, last = segment(run, from_step, names)
    sigs = []
    for name in steps:
        if name in NODE_STEPS:
            sigs.append(signature(f"node.{name}", args=(payload,), immutable=True).set(queue=run.node.queue))
        elif name == "verify":
            sigs.append(_takes_snapshot("control.verify", run, after=sigs))
        else:
            sig = signature(f"control.{name}", args=(run.pk,), immutable=True).set(queue=CONTROL_QUEUE)
            sigs.append(sig.set(priority=SLOT_PRIORITY) if name == "slot" else sig)
    if last:
        sigs.append(_takes_snapshot("control.complete", run, after=sigs))
    return chain(*sigs)


def _takes_snapshot(name: str, run: UpdateRun, after: list[Any]) -> Any:
    """verify and complete come right after a node step (reboot or install, resume),
    which returns the node's snapshot: not immutable, the chain hands it on, so that they
    never depend on that step's report (which queues behind them) having arrived.
    First in a chain, they get None."""
    args = (run.pk,) if after else (None, run.pk)
    return signature(name, args=args, immutable=not after).set(queue=CONTROL_QUEUE)


def start_update_phase(run_id: int) -> bool:
    """Carry a scheduled run from its download into its update phase, once.
    A download still under way continues the run itself when it succeeds."""
    run = UpdateRun.objects.select_related("node__cluster").get(pk=run_id)
    if run.trigger != UpdateRun.Trigger.SCHEDULED or run.state != UpdateRun.State.RUNNING or waiting(run):
        return False
    pending = first_unfinished(run)
    if pending is None or (pending.name == "download" and pending.state == UpdateStep.State.RUNNING):
        return False
    if not UpdateRun.objects.filter(pk=run_id, update_phase_started=False).update(update_phase_started=True):
        return False
    transaction.on_commit(lambda: dispatch(run_id, pending.name))
    return True


def step_names(run: UpdateRun) -> list[str]:
    return list(run.steps.order_by("position").values_list("name", flat=True))


def first_unfinished(run: UpdateRun) -> UpdateStep | None:
    return run.steps.unfinished().first()


def dispatch(run_id: int, from_step: str | None = None) -> None:
    run = UpdateRun.objects.select_related("node__cluster", "release").get(pk=run_id)
    if run.state != UpdateRun.State.RUNNING:
        return
    if from_step is None:
        pending = first_unfinished(run)
        if pending is None:
            return
        from_step = pending.name
    _queue(run, from_step)


def _queue(run: UpdateRun, from_step: str, names: list[str] | None = None) -> None:
    build_chain(run, from_step, names).apply_async()
    log.info("run %s dispatched from %s to %s", run.pk, from_step, run.node.queue)


# --- what nodes report ------------------------------------------------------------


def apply_snapshot(hostname: str, snapshot: dict[str, Any]) -> Node | None:
    """Store what an agent says about its node. Returns the node, or None if unknown."""
    if not store_snapshot(hostname, snapshot):
        return None
    return Node.objects.get(hostname=hostname)


def store_snapshot(hostname: str, snapshot: dict[str, Any]) -> bool:
    """apply_snapshot without reading the node back: False if the node is unknown."""
    fields = {
        "installed_version": str(snapshot.get("installed_version", "")),
        "installed_packages": dict(snapshot.get("packages", {})),
        "logged_in_users": sorted(snapshot.get("users", [])),
        "logon_enabled": bool(snapshot.get("logon_enabled", True)),
        "in_load_balancer": bool(snapshot.get("in_load_balancer", False)),
        "reported_maintenance": bool(snapshot["maintenance"]) if "maintenance" in snapshot else None,
        "boot_id": str(snapshot.get("boot_id", "")),
        "agent_instance": str(snapshot.get("agent_instance", "")),
    }
    if snapshot.get("worker"):
        fields["worker_instance"] = fields["agent_instance"]
    now = timezone.now()
    taken = datetime.fromtimestamp(float(snapshot["taken_at"]), tz=UTC) if "taken_at" in snapshot else now
    nodes = Node.objects.filter(hostname=hostname)
    newer = nodes.filter(Q(reported_at__isnull=True) | Q(reported_at__lte=taken))
    if newer.update(**fields, reported_at=taken, last_seen=now):
        return True
    # An older snapshot processed late: the node was still seen. A worker's report
    # still says that its worker is up, if it is the node's current agent: a heartbeat
    # taken just after it may have been processed first (two control processes).
    if "worker_instance" in fields:
        nodes.filter(agent_instance=fields["agent_instance"]).update(worker_instance=fields["worker_instance"])
    if nodes.update(last_seen=now):
        return True
    log.warning("report from unknown node %r ignored", hostname)
    return False


def store_run_snapshot(run_id: int, snapshot: dict[str, Any] | None) -> None:
    """A snapshot a chain handed on, stored for the run's node."""
    if snapshot:
        hostname = Node.objects.filter(runs__pk=run_id).values_list("hostname", flat=True).first()
        if hostname:
            store_snapshot(hostname, snapshot)


def record_step(
    run_id: int,
    step: str,
    event: str,
    *,
    detail: str = "",
    bytes_done: int | None = None,
    bytes_total: int | None = None,
    snapshot: dict[str, Any] | None = None,
    hostname: str = "",
    at: float | None = None,
    started: float | None = None,
) -> None:
    """Record one event of a step: started, progress, succeeded, skipped or failed.

    `at` is when it happened on the node (epoch seconds): a step's times are the
    node's, not when a control worker got round to the report, which may be
    seconds later under load. A node clock ahead of ours is capped at now.
    `started` comes with the outcome of a step that ended before it announced
    itself (nodes.tasks.Reporter): one report says when it started and ended."""
    # One transaction: a report is a handful of small writes, and one commit each
    # would be most of what it costs. The node's row comes last, as in complete_run
    # and fail_run (run, steps, node): the same lock order everywhere, no deadlock.
    with transaction.atomic():
        now = timezone.now()
        when = _node_time(at, now)
        began = _node_time(started, now) if started is not None else None
        _record_event(
            run_id, step, event, when, began=began, detail=detail, bytes_done=bytes_done, bytes_total=bytes_total
        )
        if snapshot and hostname:
            store_snapshot(hostname, snapshot)


def _node_time(at: float | None, now: datetime) -> datetime:
    return min(datetime.fromtimestamp(at, tz=UTC), now) if at is not None else now


def _record_event(
    run_id: int,
    step: str,
    event: str,
    when: datetime,
    *,
    began: datetime | None,
    detail: str,
    bytes_done: int | None,
    bytes_total: int | None,
) -> None:
    now = timezone.now()
    running = UpdateRun.objects.running().filter(pk=run_id)
    if not running.update(last_activity_at=now) and event not in ("succeeded", "skipped"):
        # The run ended already: a late or duplicate report. A late success still lands
        # on its step: the chain's next task may be processed before this report.
        return
    steps = UpdateStep.objects.filter(run_id=run_id, name=step)
    changes: dict[str, Any] = {}
    if bytes_done is not None:
        changes["bytes_done"] = bytes_done
    if bytes_total is not None:
        changes["bytes_total"] = bytes_total
    if detail:
        changes["detail"] = detail[:2000]
    if event == "started":
        # Reports can arrive out of order (several control processes): never reopen a finished step.
        steps.exclude(state__in=[UpdateStep.State.SUCCEEDED, UpdateStep.State.SKIPPED]).update(
            state=UpdateStep.State.RUNNING, started_at=when, attempts=F("attempts") + 1, **changes
        )
    elif event == "progress":
        steps.running().update(**changes)
    elif event in ("succeeded", "skipped"):
        # started_at too: its own report may be processed after this one, or never sent.
        steps.update(state=event, finished_at=when, **_began(began or when), **changes)
        if step == "download":
            clear_download_warning(run_id)
            start_update_phase(run_id)
    elif event == "failed":
        if step == "download" and retry_download_later(run_id, detail):
            return
        steps.update(state=UpdateStep.State.FAILED, finished_at=when, **_began(began), **changes)
        fail_run(run_id, f"{step}: {detail or 'failed'}")
    else:
        log.warning("unknown step event %r for run %s ignored", event, run_id)


def _began(began: datetime | None) -> dict[str, Any]:
    """A step that was never announced as started: its start (if known) and its attempt."""
    if began is None:
        return {}
    first = Q(started_at__isnull=True)
    return {
        "started_at": Coalesce("started_at", Value(began)),
        "attempts": Case(When(first, then=F("attempts") + 1), default=F("attempts"), output_field=IntegerField()),
    }


def clear_download_warning(run_id: int) -> None:
    """Only a complete, verified download clears the warning flag (the manual)."""
    Node.objects.filter(runs__pk=run_id, download_warning=True).update(
        download_warning=False, download_warning_since=None
    )


def retry_download_later(run_id: int, detail: str) -> bool:
    """The manual's download policy for scheduled runs. The first failed round of
    attempts sets the node's warning flag and leaves the download for 10 more
    attempts immediately before the update. True if the run goes on; False when
    the run must fail (a manual run, or the second round), in which case a
    scheduled run's time control is switched off too."""
    run = UpdateRun.objects.select_related("node__cluster", "schedule").get(pk=run_id)
    if run.trigger != UpdateRun.Trigger.SCHEDULED or run.state != UpdateRun.State.RUNNING:
        return False
    if UpdateRun.objects.filter(pk=run_id, download_rounds=0).update(download_rounds=1):
        Node.objects.filter(pk=run.node_id, download_warning=False).update(
            download_warning=True, download_warning_since=timezone.now()
        )
        UpdateStep.objects.filter(run=run, name="download").update(
            state=UpdateStep.State.PENDING,
            detail=f"{settings.TGP_DOWNLOAD_ATTEMPTS} attempts failed ({detail}); warning flag set; "
            "the download is tried again immediately before the update",
        )
        log.warning("run %s: download failed, warning flag set on %s", run_id, run.node)
        start_update_phase(run_id)  # the update time may have come already: then the second round starts now
        return True
    if run.schedule is not None:
        from updates.schedules import disable_time_control

        disable_time_control(run.schedule, f"download for {run.node} failed twice (run {run_id})")
    return False


def fail_run(run_id: int, reason: str) -> bool:
    """End the run as failed and lock the node. The node stays in maintenance:
    only an error-free run ends it (the manual's rule). Returns False if the run
    had ended already."""
    with transaction.atomic():
        ended = UpdateRun.objects.filter(pk=run_id, state=UpdateRun.State.RUNNING).update(
            state=UpdateRun.State.FAILED, error=reason[:4000], finished_at=timezone.now()
        )
        if not ended:
            return False
        run = UpdateRun.objects.select_related("node").get(pk=run_id)
        UpdateStep.objects.filter(run=run, state=UpdateStep.State.RUNNING).update(
            state=UpdateStep.State.FAILED, finished_at=timezone.now()
        )
        set_lock(run.node, f"Update to run {run_id} failed: {reason}", run=run)
    log.error("run %s failed: %s", run_id, reason)
    return True


def set_lock(node: Node, reason: str, run: UpdateRun | None = None) -> UpdateLock:
    existing = active_lock(node)
    if existing:
        return existing
    return UpdateLock.objects.create(node=node, reason=reason[:4000], run=run)


def remove_lock(node: Node, user: Any) -> bool:
    """Remove the node's active lock, keeping it as history. False if there was none."""
    return bool(
        UpdateLock.objects.active()
        .filter(node=node)
        .update(removed_at=timezone.now(), removed_by=user if getattr(user, "pk", None) else None)
    )


class NodeNotBack(Exception):
    """The node has not yet reported the new boot and version (retried)."""


class RunFailed(Exception):
    """Stops the chain after the run was recorded as failed."""


WORKER_GRACE = timedelta(seconds=15)


class CarriedOn(Exception):
    """Another verify of the same run found the node back first and carries the run
    on: this chain stops here."""


def target_reached(run: UpdateRun, node: Node) -> bool:
    wanted = run.release.packages.all()
    if run.packages:
        wanted = wanted.filter(name__in=run.packages)
    installed = node.installed_packages or {}
    if any(installed.get(p.name) != p.version for p in wanted):
        return False
    return bool(run.packages) or node.installed_version == run.release.version


def verify_node_back(run_id: int, snapshot: dict[str, Any] | None = None) -> None:
    """Succeeds once the node reports the target version (and a new boot, if it
    had to reboot); fails the run after TGP_REBOOT_TIMEOUT; else NodeNotBack.

    `snapshot` is the node's state after its last step, handed on by the chain:
    verify never waits for that step's report, which may still be queued."""
    verify = UpdateStep.objects.filter(run_id=run_id, name="verify")
    # Started now, on the first attempt: not once the checks below are done.
    verify.filter(state=UpdateStep.State.PENDING, run__state=UpdateRun.State.RUNNING).update(
        state=UpdateStep.State.RUNNING, started_at=timezone.now(), attempts=1
    )
    store_run_snapshot(run_id, snapshot)
    run = UpdateRun.objects.select_related("node", "release").get(pk=run_id)
    if run.state == UpdateRun.State.SUCCEEDED:
        raise CarriedOn(f"run {run_id} succeeded already")  # a retry that outlived its run
    if run.state != UpdateRun.State.RUNNING:
        raise RunFailed(f"run {run_id} is {run.state}")
    node = run.node
    now = timezone.now()

    def since() -> datetime:  # only asked when waiting: not a query on every successful verify
        # A release that needs no reboot has no reboot step (plan_steps).
        rebooted_at = run.steps.filter(name=UpdateStep.Name.REBOOT).values_list("finished_at", flat=True).first()
        return rebooted_at or verify.values_list("started_at", flat=True).first() or now

    # From the release, not from the reboot step's row: its report may still be on the way.
    # Back means its agent's worker consumes again: the chain's next step is for it. Its
    # ready report may be lost (Redis restarted while a control worker held it): after
    # WORKER_GRACE the new boot is enough, and resume waits for the worker in its queue.
    worker_up = node.worker_instance == node.agent_instance or now - since() > WORKER_GRACE
    rebooted = not run.release.needs_reboot or (node.boot_id != run.boot_id_before and worker_up)
    if target_reached(run, node) and rebooted:
        # Claimed: of two verifies that find the node back (the chain's, retrying, and
        # the one the worker's ready report queued), only one carries the run on.
        # The claim is the step's success: one write for both (verify is on a slot's critical path).
        detail = f"{node} runs {node.installed_version}, boot {node.boot_id[:8]}"
        with transaction.atomic():
            if not verify.exclude(state=UpdateStep.State.SUCCEEDED).update(
                state=UpdateStep.State.SUCCEEDED, finished_at=now, detail=detail
            ):
                raise CarriedOn(f"run {run_id}: verified already")
            UpdateRun.objects.running().filter(pk=run_id).update(last_activity_at=now)
        return
    # Waiting for the node is not silence: keep the run away from the reconciler and the reaper.
    UpdateRun.objects.filter(pk=run_id).update(last_activity_at=now)
    if now - since() > timedelta(seconds=settings.TGP_REBOOT_TIMEOUT):
        fail_run(run_id, f"verify: {node} did not come back within {settings.TGP_REBOOT_TIMEOUT:.0f} s")
        raise RunFailed(f"run {run_id} failed")
    raise NodeNotBack(f"{node} not back yet")


def complete_run(run_id: int, snapshot: dict[str, Any] | None = None) -> bool:
    """Mark an error-free run succeeded and end the node's maintenance mode.
    `snapshot`: the node's state after resume, handed on by the chain, so that the
    node shows logon on and back in the load balancer when the run shows succeeded.
    One transaction; then the node's slot goes to the next waiter."""
    with transaction.atomic():
        done = UpdateRun.objects.filter(pk=run_id, state=UpdateRun.State.RUNNING).update(
            state=UpdateRun.State.SUCCEEDED, finished_at=timezone.now()
        )
        if not done:
            return False
        run = UpdateRun.objects.select_related("node__cluster").get(pk=run_id)
        # The chain reaches this point only after every step succeeded: a step whose
        # own report was lost (a control worker killed, or an agent killed between the
        # chain's next message and the report, see nodes.tasks.NodeStep) must not show
        # as running or pending. A report that arrives later still lands on its step.
        run.steps.filter(state__in=[UpdateStep.State.RUNNING, UpdateStep.State.PENDING]).update(
            state=UpdateStep.State.SUCCEEDED, finished_at=timezone.now()
        )
        if snapshot:  # the node's row last, as everywhere (run, steps, node): no deadlock
            store_snapshot(run.node.hostname, snapshot)
        Node.objects.filter(pk=run.node_id).update(maintenance_mode=False, maintenance_reason="")
    release_slot(run.node, run.slot_token)
    log.info("run %s succeeded", run_id)
    return True


# --- the cluster cap ------------------------------------------------------------------


class SlotWait(Exception):
    """Every update slot of the cluster is taken: the node waits in line (it does not fail)."""


class HoldOn(Exception):
    """The load-balancer lead time has not passed yet (retried)."""


def cluster_slots() -> ClusterSlots:
    return shared_slots(settings.REDIS_URL)


def take_slot(run_id: int) -> None:
    """Hold one of the cluster's update slots, then queue the rest of the run with
    the slot's fencing token. SlotWait while the cluster is full.

    On the slot's critical path when a release hands it to the next waiter
    (wake_waiters): two reads, one transaction of two writes, and the chain queued
    from the objects at hand."""
    run = UpdateRun.objects.select_related("node__cluster", "release").get(pk=run_id)
    names, states = zip(*run.steps.order_by("position").values_list("name", "state"), strict=True)
    state = states[names.index("slot")]
    if run.state != UpdateRun.State.RUNNING or state == UpdateStep.State.SUCCEEDED:
        return  # ended, or a duplicate of a slot step that already went on
    step = UpdateStep.objects.filter(run_id=run_id, name="slot")
    if state == UpdateStep.State.PENDING:
        step.filter(state=state).update(state=UpdateStep.State.RUNNING, started_at=timezone.now(), attempts=1)
    cluster, node = run.node.cluster, run.node
    assert cluster is not None
    token = cluster_slots().acquire(cluster.name, node.hostname, cluster.max_parallel_updates)
    if token is None:
        holders = ", ".join(h.node for h in cluster_slots().holders(cluster.name))
        # No last_activity_at: the reaper and the reconciler leave waiting runs alone.
        step.update(detail=f"waiting in line: all {cluster.max_parallel_updates} slots were taken ({holders})")
        raise SlotWait(f"{node} waits for an update slot of {cluster}")
    # Stamped once held, not when asked: the slot may have been freed in between, and
    # the step's end must never come before the release that made room for it.
    held_at = timezone.now()
    with transaction.atomic():
        if not step.filter(state=UpdateStep.State.RUNNING).update(
            state=UpdateStep.State.SUCCEEDED, finished_at=held_at, detail=f"slot held, fencing token {token}"
        ):
            return  # a duplicate was faster
        drain_at = max(run.scheduled_for, held_at + cluster.lb_lead_time) if run.scheduled_for else None
        if (
            not UpdateRun.objects.running()
            .filter(pk=run_id)
            .update(slot_token=token, drain_not_before=drain_at, last_activity_at=held_at)
        ):
            return  # ended meanwhile: not carried on; its node keeps the slot until maintenance ends
        run.slot_token = token
        # Named, not "the first unfinished step": an earlier step's report may still be queued.
        after_slot = names[names.index("slot") + 1]
        transaction.on_commit(lambda: _queue(run, after_slot, list(names)))


def hold(run_id: int) -> None:
    """Out of the load balancer, a cluster node keeps its users for the lead time."""
    run = UpdateRun.objects.get(pk=run_id)
    if run.state != UpdateRun.State.RUNNING:
        raise RunFailed(f"run {run_id} is {run.state}")
    now = timezone.now()
    UpdateRun.objects.filter(pk=run_id).update(last_activity_at=now)
    if run.drain_not_before and now < run.drain_not_before:
        record_step(run_id, "hold", "started", detail=f"users are logged off at {run.drain_not_before:%H:%M:%S}")
        raise HoldOn(f"run {run_id} holds until {run.drain_not_before}")
    record_step(run_id, "hold", "succeeded")


def release_slot(node: Node, token: int | None = None) -> None:
    """Free the node's slot (once it is back in service) and wake the next waiter."""
    cluster = node.cluster
    if cluster is None:
        return
    if cluster_slots().release(cluster.name, node.hostname, token) or token is None:
        wake_waiters(cluster)


def wake_waiters(cluster: Cluster) -> int:
    """Offer the cluster's free slots to its waiting nodes, longest waiter first; the
    slot is taken here, in place, and the run's next steps are queued. A waiting
    node has no task of its own (control.slot ends when the cluster is full): it
    goes on when a release calls this, or when the reconciler does, should a
    release have been lost. Returns how many waiters went on."""
    held = {h.node for h in cluster_slots().holders(cluster.name)}
    waiting = UpdateStep.objects.in_line().filter(run__node__cluster=cluster).order_by("started_at")
    # A waiter whose node holds a slot already (its slot step was cut short after
    # taking one) goes first: it counts against the cap, and no release would wake it.
    holding = list(waiting.filter(run__node__hostname__in=held).values_list("run_id", flat=True))
    free = max(cluster.max_parallel_updates - len(held), 0)
    first = list(waiting.exclude(run__node__hostname__in=held).values_list("run_id", flat=True)[:free])
    woken = 0
    for run_id in holding + first:
        try:
            take_slot(run_id)
        except SlotWait:  # another hand-off was faster: this one keeps its place in line
            continue
        woken += 1
    return woken


def node_reported(hostname: str, snapshot: dict[str, Any]) -> None:
    """A heartbeat. If the agent restarted in the middle of a run (a crash, not
    the reboot step), queue the run again from its first unfinished step: every
    node step is safe to run twice."""
    before = Node.objects.filter(hostname=hostname).values_list("agent_instance", "boot_id").first()
    node = apply_snapshot(hostname, snapshot)
    if node is not None and snapshot.get("worker"):
        wake_verify(node)
    if node is None or before is None or not before[0] or before[0] == node.agent_instance:
        return
    if before[1] != node.boot_id:
        return  # this restart is a reboot (the run's own): the chain goes on by itself
    run = UpdateRun.objects.running().filter(node=node).first()
    if run is None:
        return
    pending = first_unfinished(run)
    if pending is None or pending.name not in NODE_STEPS:
        return
    if pending.state == UpdateStep.State.PENDING and waiting(run):
        return  # a scheduled run between its two phases: nothing is lost
    log.warning("agent of %s restarted during run %s: resuming at %s", hostname, run.pk, pending.name)
    transaction.on_commit(lambda: dispatch(run.pk, pending.name))


def wake_verify(node: Node) -> None:
    """The node's worker takes work again: a run whose verify waits for it (between
    two retries, up to 3 s apart) goes on now. The verify queued here and the waiting
    one both check; the first to find the node back claims the step."""
    for run_id in UpdateStep.objects.waiting("verify").filter(run__node=node).values_list("run_id", flat=True):
        transaction.on_commit(partial(dispatch, run_id, "verify"))


CONTROL_STEPS = {"slot", "hold", "verify"}


def reconcile() -> int:
    """Carry on runs whose chain was lost: a control worker killed while it held a
    message (control tasks are acknowledged on receipt, and Redis would only
    redeliver after its visibility timeout). Every step it queues is safe to run
    twice. Returns how many runs it touched."""
    cutoff = timezone.now() - timedelta(seconds=settings.TGP_RECONCILE_AFTER)
    touched = 0
    in_line = UpdateStep.objects.in_line()
    quiet = UpdateRun.objects.running().filter(last_activity_at__lt=cutoff)
    # A node waiting in line is not lost, and may wait long: not walked one by one here.
    for run in quiet.exclude(pk__in=in_line.values("run_id")).select_related("node__cluster", "release"):
        touched += _carry_on(run, cutoff)
    # Waiting nodes have no task that retries: free slots are offered again here.
    for cluster in Cluster.objects.filter(pk__in=in_line.values("run__node__cluster")):
        touched += wake_waiters(cluster)
    return touched


def _carry_on(run: UpdateRun, cutoff: datetime) -> bool:
    if waiting(run):
        return False
    if run.trigger == UpdateRun.Trigger.SCHEDULED and not run.update_phase_started:
        return start_update_phase(run.pk)
    pending = first_unfinished(run)
    if pending is None:
        return complete_run(run.pk)
    if pending.name == "reboot" and run.release.needs_reboot and run.node.boot_id != run.boot_id_before:
        # The node rebooted, but neither the reboot step's report nor the chain's verify
        # reached us (a control worker or Redis went down holding them): verify goes on.
        log.warning("run %s: %s rebooted, its reboot step was never reported: carrying on at verify", run.pk, run.node)
        UpdateRun.objects.filter(pk=run.pk).update(last_activity_at=timezone.now())
        transaction.on_commit(partial(dispatch, run.pk, "verify"))
        return True
    agent_alive = run.node.last_seen is not None and run.node.last_seen > cutoff
    lost_node_step = pending.name in NODE_STEPS and pending.state == UpdateStep.State.PENDING and agent_alive
    if pending.name in CONTROL_STEPS or lost_node_step:
        log.warning("run %s was quiet since %s: carrying on at %s", run.pk, run.last_activity_at, pending.name)
        UpdateRun.objects.filter(pk=run.pk).update(last_activity_at=timezone.now())
        transaction.on_commit(lambda: dispatch(run.pk, pending.name))
        return True
    return False


def reap_stale_runs() -> int:
    """Fail runs whose node went silent for longer than TGP_RUN_STALL_TIMEOUT."""
    cutoff = timezone.now() - timedelta(seconds=settings.TGP_RUN_STALL_TIMEOUT)
    failed = 0
    stale = (
        UpdateRun.objects.running()
        .filter(last_activity_at__lt=cutoff)
        .filter(Q(scheduled_for__isnull=True) | Q(scheduled_for__lt=cutoff))  # may rest until its update time
        .exclude(pk__in=UpdateStep.objects.in_line().values("run_id"))  # waiting in line is not silence
    )
    for run_id in stale.values_list("pk", flat=True):
        reason = f"no word from the node for {settings.TGP_RUN_STALL_TIMEOUT:.0f} s"
        failed += fail_run(run_id, reason)
    return failed
