"""Time-controlled updates: cron arithmetic and the django-celery-beat entries.

Each UpdateSchedule owns exactly two beat entries, one that fires the download
and one that fires the update, for all its nodes at once (the tasks fan out).
Fields are parsed by Celery's own crontab parser, so what passes validation
here is exactly what beat will run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from celery.schedules import crontab

from agent.shared.protocol import CONTROL_QUEUE

MAX_SEARCH_DAYS = 366 * 5


@dataclass(frozen=True)
class Cron:
    minute: str
    hour: str
    day_of_month: str
    month_of_year: str
    day_of_week: str

    @classmethod
    def parse(cls, expr: str) -> Cron:
        """ValueError with a readable message for anything beat would not run."""
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

    def next_after(self, moment: datetime, tz: ZoneInfo) -> datetime:
        """The first time strictly after `moment` at which the expression fires, in `tz`."""
        c = self._sets()
        local = moment.astimezone(tz)
        day = local.date()
        for _ in range(MAX_SEARCH_DAYS):
            if _day_matches(c, day):
                for hour in sorted(c.hour):
                    for minute in sorted(c.minute):
                        candidate = datetime.combine(day, time(hour, minute), tzinfo=tz)
                        if candidate > local:
                            return candidate
            day += timedelta(days=1)
        raise ValueError(f"{self} never fires")

    def last_at_or_before(self, moment: datetime, tz: ZoneInfo, window: timedelta) -> datetime | None:
        """The latest firing in (moment - window, moment], or None."""
        found = None
        current = self.next_after(moment - window, tz)
        while current <= moment:
            found = current
            current = self.next_after(current, tz)
        return found


def _day_matches(c: Any, day: date) -> bool:
    cron_weekday = (day.weekday() + 1) % 7  # cron: 0 is Sunday; Python: 0 is Monday
    return day.month in c.month_of_year and day.day in c.day_of_month and cron_weekday in c.day_of_week


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a time zone (use a name such as Europe/Berlin)") from None


def shift_back(cron: Cron, lead: timedelta) -> Cron:
    """The expression that fires `lead` earlier than `cron`, e.g. 1 hour before
    each update. Only exact shifts are accepted: when a shift cannot be written
    as one cron expression, the operator gets told to set the download apart."""
    minutes = int(lead.total_seconds() // 60)
    if lead.total_seconds() % 60 or minutes <= 0:
        raise ValueError("the download lead must be a positive number of whole minutes")
    c = cron._sets()
    times = sorted(h * 60 + m - minutes for h in c.hour for m in c.minute)
    day_shifts = {t // 1440 for t in times}
    new_minutes = sorted({t % 60 for t in times})
    new_hours = sorted({(t % 1440) // 60 for t in times})
    if len(times) != len(new_minutes) * len(new_hours) or len(day_shifts) != 1:
        raise ValueError(
            f"a download {minutes} minutes before '{cron}' cannot be written as one cron expression: "
            "set the download time on its own"
        )
    (days,) = day_shifts
    dow = cron.day_of_week
    if days:
        if cron.day_of_month != "*" or cron.month_of_year != "*":
            raise ValueError(
                "the download would fall on the previous day of a fixed date: set the download time on its own"
            )
        if dow != "*":
            dow = ",".join(str((d + days) % 7) for d in sorted(c.day_of_week))
    return Cron(
        ",".join(map(str, new_minutes)), ",".join(map(str, new_hours)), cron.day_of_month, cron.month_of_year, dow
    )


# --- the beat entries ------------------------------------------------------------------
# Imported late: the cron arithmetic above is used by model validation, and the
# node agent never needs any of this.

DOWNLOAD_TASK = "control.scheduled_download"
UPDATE_TASK = "control.scheduled_update"


def download_cron(schedule: Any) -> Cron:
    if schedule.download_cron:
        return Cron.parse(schedule.download_cron)
    return shift_back(Cron.parse(schedule.cron), schedule.download_lead)


def update_entry_lead(schedule: Any) -> timedelta:
    """The update entry of a cluster schedule fires the load-balancer lead time
    early: nodes leave the load balancer then, and are updated at the update time."""
    return schedule.cluster.lb_lead_time if schedule.cluster_id else timedelta(0)


def sync_beat(schedule: Any) -> None:
    """Create or update the schedule's pair of beat entries (saving a PeriodicTask
    tells beat to reload; bulk changes call PeriodicTasks.update_changed())."""
    from django_celery_beat.models import PeriodicTask

    pairs = [("download", DOWNLOAD_TASK), ("update", UPDATE_TASK)]
    for kind, task_name in pairs:
        task = getattr(schedule, f"{kind}_task") or PeriodicTask(name=f"tgpadmin schedule {schedule.pk}: {kind}")
        task.task = task_name
        task.kwargs = f'{{"schedule_id": {schedule.pk}}}'
        task.queue = CONTROL_QUEUE
        task.enabled = schedule.time_control
        task.description = f"{kind.capitalize()} of {schedule} (tgpadmin UpdateSchedule {schedule.pk})"
        _set_timing(task, schedule, kind)
        task.save()
        setattr(schedule, f"{kind}_task", task)
    type(schedule).objects.filter(pk=schedule.pk).update(
        download_task=schedule.download_task, update_task=schedule.update_task
    )


def _set_timing(task: Any, schedule: Any, kind: str) -> None:
    from django_celery_beat.models import ClockedSchedule, CrontabSchedule

    task.crontab = task.clocked = None
    task.one_off = False
    if schedule.run_at:
        lead = update_entry_lead(schedule) if kind == "update" else schedule.download_lead
        when = schedule.run_at - lead
        task.clocked, _ = ClockedSchedule.objects.get_or_create(clocked_time=when)
        task.one_off = True
        return
    cron = Cron.parse(schedule.cron) if kind == "update" else download_cron(schedule)
    if kind == "update" and schedule.cluster_id:
        cron = shift_back(cron, update_entry_lead(schedule)) if update_entry_lead(schedule) else cron
    task.crontab, _ = CrontabSchedule.objects.get_or_create(
        minute=cron.minute, hour=cron.hour, day_of_month=cron.day_of_month, month_of_year=cron.month_of_year,
        day_of_week=cron.day_of_week, timezone=schedule.timezone,
    )  # fmt: skip


def disable_time_control(schedule: Any, reason: str) -> None:
    """The manual: after a definitively failed download, time control is switched off."""
    from django_celery_beat.models import PeriodicTask, PeriodicTasks

    type(schedule).objects.filter(pk=schedule.pk).update(time_control=False, disabled_reason=reason)
    PeriodicTask.objects.filter(pk__in=[schedule.download_task_id, schedule.update_task_id]).update(enabled=False)
    PeriodicTasks.update_changed()


def set_time_control(schedules: Any, enabled: bool) -> int:
    """Bulk switch (admin action): one UPDATE each, and beat is told."""
    from django_celery_beat.models import PeriodicTask, PeriodicTasks

    ids = list(schedules.values_list("pk", flat=True))
    count = schedules.model.objects.filter(pk__in=ids).update(time_control=enabled, disabled_reason="")
    tasks = schedules.model.objects.filter(pk__in=ids).values_list("download_task_id", "update_task_id")
    PeriodicTask.objects.filter(pk__in=[t for pair in tasks for t in pair if t]).update(enabled=enabled)
    PeriodicTasks.update_changed()
    return int(count)


def delete_beat_entries(schedule: Any) -> None:
    from django_celery_beat.models import PeriodicTask

    PeriodicTask.objects.filter(pk__in=[schedule.download_task_id, schedule.update_task_id]).delete()


def next_update_at(schedule: Any, after: datetime) -> datetime | None:
    if schedule.run_at:
        return schedule.run_at if schedule.run_at > after else None
    return Cron.parse(schedule.cron).next_after(after, zone(schedule.timezone))
