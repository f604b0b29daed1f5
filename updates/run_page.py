"""The run page's steps: when each started and ended, how long it took, and the
fragment the page's small script fetches to show progress without reloading."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from updates.models import UpdateStep


@dataclass(frozen=True)
class StepRow:
    step: UpdateStep
    duration: str  # "" before the step started; "so far" while it runs


def format_duration(elapsed: timedelta) -> str:
    """Seconds with a tenth under a minute (steps of a few seconds differ there),
    minutes and seconds under an hour, hours and minutes above."""
    seconds = max(elapsed.total_seconds(), 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def step_duration(step: UpdateStep, now: datetime) -> str:
    if step.started_at is None:
        return ""
    if step.finished_at is not None:
        return format_duration(step.finished_at - step.started_at)
    if step.state == UpdateStep.State.RUNNING:
        return f"{format_duration(now - step.started_at)} so far"
    return ""


def step_rows(run_id: int) -> list[StepRow]:
    """The run's steps in order, with their durations: one query."""
    now = timezone.now()
    steps = UpdateStep.objects.filter(run_id=run_id).order_by("position")
    return [StepRow(step, step_duration(step, now)) for step in steps]
