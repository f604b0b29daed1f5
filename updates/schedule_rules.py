"""Validation of an UpdateSchedule: every rule gives the operator a clear error
on the field it concerns, and nothing is saved."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.utils import timezone

from updates.schedules import Cron, shift_back, zone


def validate_schedule(schedule: Any) -> None:
    errors: dict[str, str] = {}
    _target(schedule, errors)
    _timing(schedule, errors)
    if errors:
        raise ValidationError(errors)


def _target(schedule: Any, errors: dict[str, str]) -> None:
    if bool(schedule.node_id) == bool(schedule.cluster_id):
        errors["__all__"] = "Choose either a single system or a cluster."
    elif schedule.node_id and schedule.node.cluster_id:
        errors["node"] = f"{schedule.node} is a node of cluster {schedule.node.cluster}: schedule the cluster instead."
    elif schedule.cluster_id and schedule.cluster.max_parallel_updates < 1:
        errors["cluster"] = "The cluster allows no node to update (maximum below 1): fix the cluster first."


def _timing(schedule: Any, errors: dict[str, str]) -> None:
    try:
        zone(schedule.timezone)
    except ValueError as exc:
        errors["timezone"] = str(exc)
    if bool(schedule.cron) == bool(schedule.run_at):
        errors.setdefault("__all__", "Set either a recurring window (cron) or a one-off date, not both.")
        return
    if schedule.download_lead is None or schedule.download_lead.total_seconds() <= 0:
        errors["download_lead"] = "The download must start before its update: use a positive lead."
        return
    if schedule.run_at:
        _one_off(schedule, errors)
    else:
        _recurring(schedule, errors)


def _one_off(schedule: Any, errors: dict[str, str]) -> None:
    if schedule.download_cron:
        errors["download_cron"] = "A one-off update downloads `download lead` before it; leave this empty."
    if schedule.run_at <= timezone.now():
        errors["run_at"] = "This date lies in the past."


def _recurring(schedule: Any, errors: dict[str, str]) -> None:
    try:
        cron = Cron.parse(schedule.cron)
    except ValueError as exc:
        errors["cron"] = str(exc)
        return
    if schedule.cluster_id and schedule.cluster.lb_lead_time.total_seconds() > 0:
        try:
            shift_back(cron, schedule.cluster.lb_lead_time)
        except ValueError as exc:
            errors["cron"] = f"With the cluster's load-balancer lead time: {exc}"
    if schedule.download_cron:
        _download_window(schedule, cron, errors)
        return
    try:
        shift_back(cron, schedule.download_lead)
    except ValueError as exc:
        errors["download_lead"] = str(exc)


def _download_window(schedule: Any, cron: Cron, errors: dict[str, str]) -> None:
    try:
        download = Cron.parse(schedule.download_cron)
    except ValueError as exc:
        errors["download_cron"] = str(exc)
        return
    tz = zone(schedule.timezone) if "timezone" not in errors else timezone.get_current_timezone()
    now = timezone.now()
    next_update = cron.next_after(now, tz)
    if download.next_after(now, tz) >= next_update:
        errors["download_cron"] = (
            f"The next download would come after the next update ({next_update:%Y-%m-%d %H:%M}): "
            "the download must come first."
        )
