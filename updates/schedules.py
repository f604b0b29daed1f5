"""Time-controlled updates: when a schedule's download and update fire, and the
django-celery-beat entries that fire them.

This module is the only source of firing instants. A cron expression is read in
the schedule's zone, wall clock to instant, by one rule (`instant`):

- a wall-clock time inside a spring-forward gap moves forward by the gap
  (02:30 on the night clocks go from 02:00 to 03:00 fires at 03:30);
- a wall-clock time that repeats in autumn fires once, at its first occurrence
  (02:30 summer time, not 02:30 standard time an hour later);
- two wall-clock times that become the same instant fire once.

A download derived from an update by a lead is the update *instant* minus the
lead, and a cluster's update entry fires the load-balancer lead time before the
update instant: absolute durations, so a download and its update never coincide.

Each schedule owns two beat entries (download, update), each a one-off
ClockedSchedule armed for its next firing, with the firing's instants in its
kwargs. The firing re-arms its entry (updates.scheduled.fire), so does saving the
schedule, and `rearm_overdue` (beat, every minute) re-arms an entry whose firing
was lost. Beat never computes a time of ours.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from celery.schedules import crontab

from agent.shared.protocol import CONTROL_QUEUE
from agent.shared.zones import canonical_zone

MAX_SEARCH_DAYS = 366 * 5
# How late an entry may fire and still count for its firing (beat was down, say).
LATE_FIRE = timedelta(hours=6)
# An entry still armed this long after its instant lost its firing: armed again.
REARM_AFTER = timedelta(minutes=5)
# The instant of an entry with no firing to come (a clocked entry needs one).
NEVER = datetime(2000, 1, 1, tzinfo=UTC)


def instant(day: date, hour: int, minute: int, tz: ZoneInfo) -> datetime:
    """The instant (UTC) of a wall-clock time in `tz`: forward by the gap in a
    spring-forward gap, the first occurrence of a repeated autumn time. (fold=0 does
    both: zoneinfo reads a time in a gap with the offset before it, and a repeated
    time as its first occurrence.)"""
    return datetime.combine(day, time(hour, minute), tzinfo=tz).replace(fold=0).astimezone(UTC)


@dataclass(frozen=True)
class Cron:
    minute: str
    hour: str
    day_of_month: str
    month_of_year: str
    day_of_week: str

    @classmethod
    def parse(cls, expr: str) -> Cron:
        """ValueError with a readable message for a bad expression. Fields are read by
        Celery's crontab parser (the syntax operators know from beat)."""
        fields = expr.split()
        if len(fields) != 5:
            raise ValueError(
                f"{expr!r} is not a cron expression: use five fields, minute hour day-of-month month day-of-week "
                "(e.g. '0 3 * * 0' for Sundays at 03:00)"
            )
        minute, hour, dom, month, dow = fields
        try:
            crontab(minute=minute, hour=hour, day_of_month=dom, month_of_year=month, day_of_week=dow)
        except Exception as exc:  # celery raises ValueError or its own ParseException
            raise ValueError(f"{expr!r} is not a valid cron expression: {exc}") from None
        return cls(minute, hour, dom, month, dow)

    def __str__(self) -> str:
        return f"{self.minute} {self.hour} {self.day_of_month} {self.month_of_year} {self.day_of_week}"

    def _sets(self) -> Any:  # celery's crontab, with its fields parsed into sets
        return crontab(
            minute=self.minute, hour=self.hour, day_of_month=self.day_of_month,
            month_of_year=self.month_of_year, day_of_week=self.day_of_week,
        )  # fmt: skip

    def instants(self, after: datetime, tz: ZoneInfo) -> Iterator[datetime]:
        """The instants (UTC) at which the expression fires, strictly after `after`,
        ascending, each once (see `instant`)."""
        c = self._sets()
        times = sorted((h, m) for h in c.hour for m in c.minute)
        # A day earlier: a gap moves times forward, never back, so nothing is missed.
        day = after.astimezone(tz).date() - timedelta(days=1)
        last = after
        for _ in range(MAX_SEARCH_DAYS):
            if _day_matches(c, day):
                for moment in sorted({instant(day, h, m, tz) for h, m in times}):
                    if moment > last:
                        last = moment
                        yield moment
            day += timedelta(days=1)

    def next_after(self, moment: datetime, tz: ZoneInfo) -> datetime:
        """The first instant strictly after `moment` at which the expression fires."""
        for found in self.instants(moment, tz):
            return found
        raise ValueError(f"'{self}' never fires")


def _day_matches(c: Any, day: date) -> bool:
    cron_weekday = (day.weekday() + 1) % 7  # cron: 0 is Sunday; Python: 0 is Monday
    return day.month in c.month_of_year and day.day in c.day_of_month and cron_weekday in c.day_of_week


def zone(name: str) -> ZoneInfo:
    """Only canonical IANA zones (agent/shared/zones.py); ValueError saying why."""
    return canonical_zone(name)


# --- a schedule's instants ------------------------------------------------------------


def update_entry_lead(schedule: Any) -> timedelta:
    """The update entry of a cluster schedule fires the load-balancer lead time
    early: nodes leave the load balancer then, and are updated at the update time."""
    return schedule.cluster.lb_lead_time if schedule.cluster_id else timedelta(0)


def updates_after(schedule: Any, after: datetime) -> Iterator[datetime]:
    """The schedule's update instants strictly after `after` (none for download only)."""
    if schedule.download_only:
        return
    if schedule.run_at:
        if schedule.run_at > after:
            yield schedule.run_at
        return
    yield from Cron.parse(schedule.cron).instants(after, zone(schedule.timezone))


def downloads_after(schedule: Any, after: datetime) -> Iterator[datetime]:
    """The instants the download entry fires, strictly after `after`: the window's own
    times for a download-only schedule, the download window's, or each update instant
    minus the lead."""
    if schedule.download_only or schedule.download_cron:
        expr = schedule.download_cron or schedule.cron
        if schedule.run_at:
            if schedule.run_at > after:
                yield schedule.run_at
            return
        yield from Cron.parse(expr).instants(after, zone(schedule.timezone))
        return
    lead = schedule.download_lead
    for update_at in updates_after(schedule, after + lead):
        yield update_at - lead


@dataclass(frozen=True)
class Firing:
    """One firing of a schedule's entry: when it fires, and the update it is for
    (None: a download with no update of this schedule after it)."""

    kind: str  # "download" or "update"
    at: datetime
    update_at: datetime | None


def next_firing(schedule: Any, kind: str, after: datetime) -> Firing | None:
    """The first firing of the entry `kind` strictly after `after`."""
    if kind == "update":
        lead = update_entry_lead(schedule)
        update_at = next(updates_after(schedule, after + lead), None)
        return Firing(kind, update_at - lead, update_at) if update_at else None
    at = next(downloads_after(schedule, after), None)
    return Firing(kind, at, next(updates_after(schedule, at), None)) if at else None


def starts_run(schedule: Any, firing: Firing) -> bool:
    """Whether a download firing starts the run of its update: only the last download
    before that update does. An earlier one (a daily download before a monthly update)
    only fetches the files: no maintenance mode, no notice, Auto-Updates not refused."""
    if firing.kind != "download" or firing.update_at is None:
        return False
    following = next(downloads_after(schedule, firing.at), None)
    return following is None or following >= firing.update_at


def upcoming(schedule: Any, after: datetime, count: int) -> list[tuple[datetime | None, datetime | None]]:
    """The next `count` (download, update) instants, each update with the last download
    before it; a download-only schedule's downloads with no update."""
    if schedule.download_only:
        return [(at, None) for _, at in zip(range(count), downloads_after(schedule, after), strict=False)]
    pairs: list[tuple[datetime | None, datetime | None]] = []
    previous = after
    for _, update_at in zip(range(count), updates_after(schedule, after), strict=False):
        last = None
        for at in downloads_after(schedule, previous):
            if at >= update_at:
                break
            last = at
        pairs.append((last, update_at))
        previous = update_at
    return pairs


# --- the beat entries ------------------------------------------------------------------
# Imported late: the arithmetic above is used by model validation.

DOWNLOAD_TASK = "control.scheduled_download"
UPDATE_TASK = "control.scheduled_update"
KINDS = {"download": DOWNLOAD_TASK, "update": UPDATE_TASK}


def sync_beat(schedule: Any, now: datetime | None = None) -> None:
    """Arm both entries for their next firing after now (on save)."""
    from django.utils import timezone

    now = now or timezone.now()
    for kind in KINDS:
        arm(schedule, kind, now)


def armed_at(task: Any) -> datetime | None:
    """When an entry is armed to fire; None if it is disabled or has no firing."""
    return task.clocked.clocked_time if task is not None and task.enabled and task.clocked_id else None


def arm(schedule: Any, kind: str, after: datetime) -> Firing | None:
    """Arm the entry `kind` for its first firing after `after` (disabled if there is
    none, or time control is off). The entry is a new row each time: beat writes its
    run count back to the row it fired, some time later, and on a one-off entry a
    count above 0 disables it; a fresh row is one beat has never fired."""
    from django_celery_beat.models import ClockedSchedule, PeriodicTask, PeriodicTasks

    firing = next_firing(schedule, kind, after)
    at = firing.at if firing else NEVER
    # The entries armed for one instant share its clocked row. Not get_or_create: its
    # time is not unique, and two control worker processes arming entries for the same
    # instant at once (500 firings re-arming for "never") may each make one; get() then
    # fails for every later entry. A second row for an instant harms nothing.
    clocked = ClockedSchedule.objects.filter(clocked_time=at).order_by("pk").first()
    clocked = clocked or ClockedSchedule.objects.create(clocked_time=at)
    old = getattr(schedule, f"{kind}_task")
    if old is not None:
        # no_changes: django-celery-beat notes a change for beat at each save and delete,
        # twice each (a signal and the method): four or five writes of its one row per
        # re-arming, and every firing re-arms. One note below is enough.
        old.no_changes = True
        old.delete()
        ClockedSchedule.objects.filter(pk=old.clocked_id, periodictask__isnull=True).exclude(pk=clocked.pk).delete()
    task = PeriodicTask(
        name=f"tgpadmin schedule {schedule.pk}: {kind}", task=KINDS[kind], queue=CONTROL_QUEUE, one_off=True,
        enabled=bool(firing and schedule.time_control), clocked=clocked,
        kwargs=json.dumps({"schedule_id": schedule.pk, "at": at.isoformat()}),
        description=f"{kind.capitalize()} of {schedule} (tgpadmin UpdateSchedule {schedule.pk})",
    )  # fmt: skip
    task.no_changes = True
    task.save()
    PeriodicTasks.update_changed()
    setattr(schedule, f"{kind}_task", task)
    type(schedule).objects.filter(pk=schedule.pk).update(**{f"{kind}_task": task})
    return firing


def rearm_overdue(now: datetime) -> int:
    """Arm again every entry of a schedule under time control that is missing, or
    still armed REARM_AFTER past its instant (its firing was lost: beat was down, or
    the task). Within LATE_FIRE of its instant it fires again (firing twice starts
    nothing twice), else the next firing is armed. Returns how many were armed."""
    from django.db import transaction
    from django.db.models import Q

    from updates.models import UpdateSchedule

    late = now - REARM_AFTER
    due = Q()
    for kind in KINDS:
        clocked = f"{kind}_task__clocked__clocked_time"
        due |= Q(**{f"{kind}_task__isnull": True}) | Q(**{f"{clocked}__lt": late, f"{clocked}__gt": NEVER})
    armed = 0
    for schedule in UpdateSchedule.objects.filter(due, time_control=True).select_related(
        "cluster", "download_task__clocked", "update_task__clocked"
    ):
        for kind in KINDS:
            task = getattr(schedule, f"{kind}_task")
            at = task.clocked.clocked_time if task is not None else None
            if at is None or NEVER < at < late:
                with transaction.atomic():
                    arm(schedule, kind, max(at - timedelta(microseconds=1), now - LATE_FIRE) if at else now)
                armed += 1
    return armed


def disable_time_control(schedule: Any, reason: str) -> None:
    """The manual: after a definitively failed download, time control is switched off."""
    from django_celery_beat.models import PeriodicTask, PeriodicTasks

    type(schedule).objects.filter(pk=schedule.pk).update(time_control=False, disabled_reason=reason)
    PeriodicTask.objects.filter(pk__in=[schedule.download_task_id, schedule.update_task_id]).update(enabled=False)
    PeriodicTasks.update_changed()


def set_time_control(schedules: Any, enabled: bool) -> int:
    """Bulk switch (admin action). Switched on, each entry is armed for its next firing
    from now (not a firing missed while it was off); switched off, both are disabled."""
    from django.db import transaction
    from django.utils import timezone
    from django_celery_beat.models import PeriodicTask, PeriodicTasks

    from audit.records import Operation, record_each

    ids = list(schedules.values_list("pk", flat=True))
    with transaction.atomic():
        count = schedules.model.objects.filter(pk__in=ids).update(time_control=enabled, disabled_reason="")
        switched = schedules.model.objects.filter(pk__in=ids).select_related("node", "cluster")
        record_each(Operation.TIME_CONTROL_ON if enabled else Operation.TIME_CONTROL_OFF, [(s, {}) for s in switched])
        if enabled:
            for schedule in schedules.model.objects.filter(pk__in=ids).select_related("cluster"):
                sync_beat(schedule, timezone.now())
        else:
            tasks = schedules.model.objects.filter(pk__in=ids).values_list("download_task_id", "update_task_id")
            PeriodicTask.objects.filter(pk__in=[t for pair in tasks for t in pair if t]).update(enabled=False)
            PeriodicTasks.update_changed()
    return int(count)


def delete_beat_entries(schedule: Any) -> None:
    from django_celery_beat.models import PeriodicTask

    PeriodicTask.objects.filter(pk__in=[schedule.download_task_id, schedule.update_task_id]).delete()


def next_update_at(schedule: Any, after: datetime) -> datetime | None:
    return next(updates_after(schedule, after), None)
