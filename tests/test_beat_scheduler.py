"""Beat keeps running when the control plane re-arms an entry that beat just fired
(updates/beat.py). Beat's scheduler runs in-process here: the race is between its copy
of an entry and the row the control worker replaced, which a real beat process hits
only by timing (bench/beat_lag.py: 500 schedules due at once stopped beat after 20)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError
from django.utils import timezone
from django_celery_beat.models import PeriodicTask
from django_celery_beat.schedulers import ModelEntry

from tgpadmin.celery import app
from updates.beat import Entry, Scheduler
from updates.models import UpdateSchedule
from updates.schedules import arm


def fired_then_rearmed(make_node, entry_class):
    """Beat's copy of a schedule's download entry right after beat sent it, and the
    schedule, whose entry the control plane has armed again since (a new row, same name)."""
    schedule = UpdateSchedule.objects.create(
        name="s", node=make_node("gw"), run_at=timezone.now() + timedelta(days=2), download_lead=timedelta(days=1)
    )
    fired = next(entry_class(PeriodicTask.objects.get(pk=schedule.download_task_id), app=app))  # beat sent it
    arm(schedule, "download", timezone.now())
    return fired, schedule


@pytest.mark.django_db
def test_django_celery_beats_own_entry_writes_a_replaced_row_back_and_fails(make_node):
    # Why updates/beat.py exists: the stock entry saves its whole copy, which INSERTs the
    # deleted row again under the name the new row holds (refused by the model's own
    # check here; by the database's unique index when the new row comes in between).
    fired, _ = fired_then_rearmed(make_node, ModelEntry)
    with pytest.raises((IntegrityError, ValidationError)):
        fired.is_due()


@pytest.mark.django_db
def test_beat_disabling_a_one_off_it_ran_leaves_the_rearmed_entry_alone(make_node):
    fired, schedule = fired_then_rearmed(make_node, Entry)
    rearmed = PeriodicTask.objects.get(pk=schedule.download_task_id)

    state = fired.is_due()
    fired.save()  # beat's sync of what it sent

    assert not state.is_due, "the one-off that ran does not run again"
    assert PeriodicTask.objects.filter(name=rearmed.name).count() == 1, "no row came back"
    again = PeriodicTask.objects.get(pk=rearmed.pk)
    assert again.enabled and again.total_run_count == 0, "the new entry will fire at its time"
    assert again.clocked_id == rearmed.clocked_id and again.kwargs == rearmed.kwargs


@pytest.mark.django_db
def test_beat_writes_back_the_run_count_of_a_row_that_still_exists(make_node):
    schedule = UpdateSchedule.objects.create(
        name="s", node=make_node("gw"), run_at=timezone.now() + timedelta(days=2), download_lead=timedelta(days=1)
    )
    fired = next(Entry(PeriodicTask.objects.get(pk=schedule.download_task_id), app=app))
    fired.save()
    assert PeriodicTask.objects.get(pk=schedule.download_task_id).total_run_count == 1
    fired.is_due()
    row = PeriodicTask.objects.get(pk=schedule.download_task_id)
    assert not row.enabled and row.total_run_count == 0, "as django-celery-beat: a one-off that ran is disabled"


def test_beat_runs_our_scheduler():
    assert app.conf.beat_scheduler == "updates.beat:Scheduler"
    assert Scheduler.Entry is Entry


def test_beat_reads_changes_at_most_once_a_second_and_sees_each_within_it(monkeypatch):
    # 500 re-armings in a burst would otherwise be 500 reloads of every entry between
    # beat's sends (bench/beat_lag.py). What a read finds is django-celery-beat's (one
    # query of the last change); here it is counted, and says "changed" every time.
    from django_celery_beat.schedulers import DatabaseScheduler

    clock, reads = [1000.0], []
    monkeypatch.setattr("updates.beat.time.monotonic", lambda: clock[0])
    monkeypatch.setattr(DatabaseScheduler, "schedule_changed", lambda self: reads.append(clock[0]) or True)
    scheduler = Scheduler(app=app, lazy=True)
    assert scheduler.schedule_changed()
    clock[0] += 0.5
    assert not scheduler.schedule_changed(), "not read again within the second"
    clock[0] += 0.6
    assert scheduler.schedule_changed(), "a change is seen after it"
    assert reads == [1000.0, 1001.1]
