"""Is the node back? After install (and the reboot, if the release needs one) the
node must report the target version, a new boot and a worker that takes work
again; of the verifies that find it back, one carries the run on."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from nodes.models import Node
from updates.models import UpdateRun, UpdateStep
from updates.runs import lifecycle
from updates.runs.chains import RunFailed, queue_from
from updates.runs.end import fail_run
from updates.runs.snapshots import store_run_snapshot

WORKER_GRACE = timedelta(seconds=15)


class NodeNotBack(Exception):
    """The node has not yet reported the new boot and version (retried)."""


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


def verify_node_back(run_id: int, snapshot: dict[str, Any] | None = None, seq: int = 0) -> None:
    """Succeeds once the node reports the target version (and a new boot, if it
    had to reboot); fails the run after TGP_REBOOT_TIMEOUT; else NodeNotBack.

    `snapshot` is the node's state after its last step, handed on by the chain:
    verify never waits for that step's report, which may still be queued."""
    # Started now, on the first attempt: not once the checks below are done.
    lifecycle.wait_step(run_id, "verify", timezone.now())
    store_run_snapshot(run_id, snapshot, seq)
    run = UpdateRun.objects.select_related("node", "release").get(pk=run_id)
    if run.state == UpdateRun.State.SUCCEEDED:
        raise CarriedOn(f"run {run_id} succeeded already")  # a retry that outlived its run
    if run.state != UpdateRun.State.RUNNING:
        raise RunFailed(f"run {run_id} is {run.state}")
    node = run.node
    now = timezone.now()

    def since() -> datetime:  # only asked when waiting: not a query on every successful verify
        # A release that needs no reboot has no reboot step (plan_steps).
        steps = UpdateStep.objects.filter(run_id=run_id)
        rebooted_at = steps.filter(name=UpdateStep.Name.REBOOT).values_list("finished_at", flat=True).first()
        return rebooted_at or steps.filter(name="verify").values_list("started_at", flat=True).first() or now

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
            if not lifecycle.claim_step(run_id, "verify", now, detail):
                raise CarriedOn(f"run {run_id}: verified already")
            lifecycle.touch(run_id, now)
        return
    # Waiting for the node is not silence: keep the run away from the reconciler and the reaper.
    lifecycle.touch(run_id, now)
    if now - since() > timedelta(seconds=settings.TGP_REBOOT_TIMEOUT):
        fail_run(run_id, f"verify: {node} did not come back within {settings.TGP_REBOOT_TIMEOUT:.0f} s")
        raise RunFailed(f"run {run_id} failed")
    raise NodeNotBack(f"{node} not back yet")


def wake_verify(node: Node) -> None:
    """The node's worker takes work again: a run whose verify waits for it (between
    two retries, up to 3 s apart) goes on now. The verify queued here and the waiting
    one both check; the first to find the node back claims the step."""
    for run_id in UpdateStep.objects.waiting("verify").filter(run__node=node).values_list("run_id", flat=True):
        queue_from(run_id, "verify")
