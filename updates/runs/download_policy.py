"""The manual's download policy for scheduled runs: a failed round of attempts
sets the node's warning flag and leaves the download for a second round right
before the node's own update phase (a cluster node's: before it leaves the load
balancer); the second failed round fails the run (an update lock) and switches
time control off: a single system's schedule, or for a cluster node its own place
in the schedule (LeftSchedule), while the rest of the cluster goes on. Only a
complete, verified download clears the flag."""

from __future__ import annotations

import logging
from datetime import datetime

from django.conf import settings
from django.utils import timezone

from nodes.models import Node
from updates.models import LeftSchedule, UpdateRun
from updates.runs import lifecycle
from updates.runs.chains import start_update_phase

log = logging.getLogger(__name__)


def clear_download_warning(run_id: int) -> None:
    """Only a complete, verified download of the update files clears the warning flag
    (the manual): the whole release of an update, an Auto-Update or a download-only
    run. A partial catch-up downloads a few packages of an old release: not those."""
    run = UpdateRun.objects.filter(pk=run_id).values("node_id", "packages").first()
    if run is None or run["packages"]:
        return
    Node.objects.filter(pk=run["node_id"], download_warning=True).update(
        download_warning=False, download_warning_since=None
    )


def download_only_failed(run_id: int, detail: str, at: datetime) -> bool:
    """A download-only run whose attempts all failed sets the warning flag and ends
    failed, with no update lock: nothing was installed, and the next update tries
    the download again (the manual: the flag "does not hinder further updates").
    False if the run is not a running download-only run."""
    if not UpdateRun.objects.filter(pk=run_id, trigger=UpdateRun.Trigger.DOWNLOAD).running().exists():
        return False
    Node.objects.filter(runs__pk=run_id, download_warning=False).update(
        download_warning=True, download_warning_since=at
    )
    lifecycle.abort_steps(run_id, at)
    lifecycle.fail_step(run_id, "download", at, began=None, detail=detail[:2000])
    lifecycle.fail_run(run_id, f"download: {detail or 'failed'}; warning flag set", at)
    log.warning("run %s: download only failed, warning flag set: %s", run_id, detail)
    return True


def retry_download_later(run_id: int, detail: str) -> bool:
    """The first failed round of attempts sets the node's warning flag and leaves the
    download for 10 more attempts immediately before the update. True if the run goes
    on; False when the run must fail (a manual run, or the second round), in which
    case a scheduled run's time control is switched off too."""
    run = UpdateRun.objects.select_related("node__cluster", "schedule").get(pk=run_id)
    if run.trigger != UpdateRun.Trigger.SCHEDULED or run.state != UpdateRun.State.RUNNING:
        return False
    if UpdateRun.objects.filter(pk=run_id, download_rounds=0).update(download_rounds=1):
        Node.objects.filter(pk=run.node_id, download_warning=False).update(
            download_warning=True, download_warning_since=timezone.now()
        )
        lifecycle.retry_step_later(
            run_id,
            "download",
            f"{settings.TGP_DOWNLOAD_ATTEMPTS} attempts failed ({detail}); warning flag set; "
            "the download is tried again immediately before the update",
        )
        log.warning("run %s: download failed, warning flag set on %s", run_id, run.node)
        start_update_phase(run_id)  # the update time may have come already: then the second round starts now
        return True
    if run.schedule is not None:
        reason = f"download for {run.node} failed twice (run {run_id})"
        if run.node.cluster_id:
            # The node leaves the schedule; the rest of the cluster goes on within its cap.
            LeftSchedule.objects.get_or_create(schedule=run.schedule, node=run.node, defaults={"reason": reason})
        else:
            from updates.schedules import disable_time_control

            disable_time_control(run.schedule, reason)
    return False
