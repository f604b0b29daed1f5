"""What a node reports about a step (control.record_step): started, progress,
succeeded, skipped or failed, recorded in one transaction per report."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from updates.models import UpdateStep
from updates.runs import lifecycle
from updates.runs.chains import start_update_phase
from updates.runs.download_policy import clear_download_warning, download_only_failed, retry_download_later
from updates.runs.end import fail_run
from updates.runs.snapshots import store_snapshot

log = logging.getLogger(__name__)


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
    seq: int = 0,
) -> None:
    """Record one event of a step: started, progress, succeeded, skipped or failed.
    (`seq`: the report's place in the node's signed sequence, for its snapshot.)

    `at` is when it happened on the node (epoch seconds): a step's times are the
    node's, not when a control worker got round to the report, which may be
    seconds later under load. A node clock ahead of ours is capped at now.
    `started` comes with the outcome of a step that ended before it announced
    itself (agent.tasks.Reporter): one report says when it started and ended."""
    # One transaction: a report is a handful of small writes, and one commit each
    # would be most of what it costs. The node's row comes last, as in complete_run
    # and fail_run (run, steps, node): the same lock order everywhere, no deadlock.
    with transaction.atomic():
        now = timezone.now()
        when = _node_time(at, now)
        began = _node_time(started, now) if started is not None else None
        changes: dict[str, Any] = {}
        if bytes_done is not None:
            changes["bytes_done"] = bytes_done
        if bytes_total is not None:
            changes["bytes_total"] = bytes_total
        if detail:
            changes["detail"] = detail[:2000]
        _record_event(run_id, step, event, when, began=began, reason=detail, changes=changes)
        if snapshot and hostname:
            store_snapshot(hostname, snapshot, seq)


def _node_time(at: float | None, now: datetime) -> datetime:
    return min(datetime.fromtimestamp(at, tz=UTC), now) if at is not None else now


def _record_event(
    run_id: int, step: str, event: str, when: datetime, *, began: datetime | None, reason: str, changes: dict[str, Any]
) -> None:
    if not lifecycle.touch(run_id) and event not in lifecycle.OUTCOMES:
        # The run ended already: a late or duplicate report. A late success still lands
        # on its step: the chain's next task may be processed before this report.
        return
    if event == "started":
        lifecycle.start_step(run_id, step, when, **changes)
    elif event == "progress":
        UpdateStep.objects.filter(run_id=run_id, name=step).running().update(**changes)
    elif event in lifecycle.OUTCOMES:
        lifecycle.finish_step(run_id, step, event, when, began=began, **changes)
        if step == "download":
            if event == "succeeded":
                clear_download_warning(run_id)
            start_update_phase(run_id)
    elif event == "failed":
        if step == "download" and (download_only_failed(run_id, reason, when) or retry_download_later(run_id, reason)):
            return
        lifecycle.fail_step(run_id, step, when, began=began, **changes)
        fail_run(run_id, f"{step}: {reason or 'failed'}")
    else:
        log.warning("unknown step event %r for run %s ignored", event, run_id)
