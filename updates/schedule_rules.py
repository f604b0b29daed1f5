"""Validation of an UpdateSchedule: every rule gives the operator a clear error
on the field it concerns, and nothing is saved.

The answer does not depend on when one saves: the order of downloads and updates
is checked for every update from the start of the day of saving (in the
schedule's zone) over HORIZON (two years: every daylight-saving change twice), at
most MAX_WORK instants, with the instants the schedule will fire at
(updates/schedules.py)."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.core.exceptions import ValidationError
from django.utils import timezone

from updates.schedules import Cron, downloads_after, updates_after, zone

HORIZON = timedelta(days=2 * 366)
MAX_WORK = 100_000


def validate_schedule(schedule: Any, now: datetime | None = None) -> None:
    errors: dict[str, str] = {}
    _target(schedule, errors)
    _timing(schedule, errors, now or timezone.now())
    if errors:
        raise ValidationError(errors)


def _target(schedule: Any, errors: dict[str, str]) -> None:
    if bool(schedule.node_id) == bool(schedule.cluster_id):
        errors["__all__"] = "Choose either a single system or a cluster."
    elif schedule.node_id and schedule.node.cluster_id:
        errors["node"] = f"{schedule.node} is a node of cluster {schedule.node.cluster}: schedule the cluster instead."
    elif schedule.cluster_id and schedule.cluster.max_parallel_updates < 1:
        errors["cluster"] = "The cluster allows no node to update (maximum below 1): fix the cluster first."


def _timing(schedule: Any, errors: dict[str, str], now: datetime) -> None:
    try:
        tz = zone(schedule.timezone)
    except ValueError as exc:
        errors["timezone"] = str(exc)
        return
    if bool(schedule.cron) == bool(schedule.run_at):
        errors.setdefault("__all__", "Set either a recurring window (cron) or a one-off date, not both.")
        return
    if schedule.download_only:
        if schedule.download_cron:
            errors["download_cron"] = "A download-only schedule downloads at the window's times: leave this empty."
    elif schedule.download_lead is None or schedule.download_lead.total_seconds() <= 0:
        errors["download_lead"] = "The download must start before its update: use a positive lead."
        return
    if schedule.run_at:
        _one_off(schedule, errors, now)
        return
    for field in ("cron", "download_cron"):
        try:
            if getattr(schedule, field):
                Cron.parse(getattr(schedule, field)).next_after(now, tz)
        except ValueError as exc:
            errors[field] = str(exc)
    if not errors and not schedule.download_only:
        _order(schedule, errors, tz, now)


def _one_off(schedule: Any, errors: dict[str, str], now: datetime) -> None:
    if schedule.download_cron:
        errors["download_cron"] = "A one-off update downloads `download lead` before it; leave this empty."
    if schedule.run_at <= now:
        errors["run_at"] = "This date lies in the past."


def _order(schedule: Any, errors: dict[str, str], tz: ZoneInfo, now: datetime) -> None:
    """Every update has a download after the update before it and before itself. One
    pass over both series; at most MAX_WORK instants in all (a download every minute)."""
    start = datetime.combine(now.astimezone(tz).date(), time(0), tzinfo=tz)
    downloads = downloads_after(schedule, start)
    pending = next(downloads, None)
    previous: datetime | None = None
    work = 0
    for update_at in updates_after(schedule, start):
        work += 1
        if work > MAX_WORK or update_at > start + HORIZON:
            return
        found = False
        while pending is not None and pending < update_at and work <= MAX_WORK:
            found = found or previous is None or pending > previous
            pending, work = next(downloads, None), work + 1
        if work > MAX_WORK:
            return
        if previous is not None and not found:
            field = "download_cron" if schedule.download_cron else "download_lead"
            errors[field] = _no_download(previous, update_at, pending, tz, bool(schedule.download_cron))
            return
        previous = update_at


def _no_download(
    previous: datetime, update_at: datetime, download_at: datetime | None, tz: ZoneInfo, window: bool
) -> str:
    def local(moment: datetime) -> str:
        return f"{moment.astimezone(tz):%Y-%m-%d %H:%M %Z}"

    after = f"the next download comes at {local(download_at)}" if download_at else "no download comes"
    fix = "set the download window apart" if window else "use a shorter download lead than the time between updates"
    return (
        f"The update at {local(update_at)} has no download of its own: after the update at {local(previous)} "
        f"{after}; the download must come first ({fix}; a time in a daylight-saving gap moves forward by the gap)."
    )
