"""Helpers shared by the management commands."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta

from django.core.management.base import CommandError, OutputWrapper
from django.utils import timezone

from updates.models import UpdateRun


def wait_for_run(run_id: int, timeout: float, stdout: OutputWrapper) -> None:
    """Follow a run until it ends; CommandError (exit 1) if it fails or outlasts timeout."""
    wait_for_runs([run_id], timeout, stdout)


def wait_for_runs(run_ids: list[int], timeout: float, stdout: OutputWrapper) -> None:
    """Follow runs until all have ended, each step as it starts; CommandError (exit 1)
    naming every run that failed or outlasted the timeout."""
    deadline = time.monotonic() + timeout
    shown: dict[int, str] = {}
    failed: list[str] = []
    pending = set(run_ids)
    several = len(run_ids) > 1  # then each line names its node
    while pending and time.monotonic() < deadline:
        for run in UpdateRun.objects.filter(pk__in=pending).with_current_step().select_related("node").order_by("pk"):
            name = f"run {run.pk} ({run.node})" if several else f"run {run.pk}"
            if run.current_step and run.current_step != shown.get(run.pk):
                shown[run.pk] = run.current_step
                stdout.write(f"  {run.node}: {run.current_step}" if several else f"  {run.current_step}")
            if run.state == UpdateRun.State.SUCCEEDED:
                stdout.write(f"{name} succeeded")
                pending.discard(run.pk)
            elif run.state == UpdateRun.State.FAILED:
                failed.append(f"{name} failed: {run.error}")
                pending.discard(run.pk)
        if pending:
            time.sleep(0.5)
    failed += [f"run {pk} still running after {timeout:.0f} s" for pk in sorted(pending)]
    if failed:
        raise CommandError("; ".join(failed))


_DURATION_RE = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?\Z")


def parse_update_time(at: str | None, in_: str | None, now: datetime | None = None) -> datetime:
    """--at ISO-TIME (naive: the control plane's time zone) or --in DURATION (2h, 90m,
    1h30m, 45s, 1d) as an aware datetime; CommandError for anything else. Whether it
    lies ahead is updates.announced.check_update_time's question."""
    now = now or timezone.now()
    if in_ is not None:
        match = _DURATION_RE.match(in_.strip())
        if not in_.strip() or match is None:
            raise CommandError(f"--in {in_!r} is not a duration such as 2h, 90m or 1h30m")
        days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
        return now + timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    try:
        value = datetime.fromisoformat(at or "")
    except ValueError:
        raise CommandError(f"--at {at!r} is not an ISO date and time such as 2026-12-06T03:00") from None
    return timezone.make_aware(value) if timezone.is_naive(value) else value
