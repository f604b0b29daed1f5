"""When a schedule fires: instants our own code computes (DST gaps forward, repeats
once, leads as durations), validation that gives the same answer whenever one
saves, only canonical time zones, and no run for an update more than one
download ahead."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from agent.shared.env import ConfigError
from agent.shared.zones import canonical_zone
from nodes.models import Cluster
from updates import scheduled
from updates.models import UpdateRun, UpdateSchedule
from updates.schedule_rules import validate_schedule
from updates.schedules import LATE_FIRE, next_firing, rearm_overdue, upcoming

pytestmark = pytest.mark.django_db
BERLIN = ZoneInfo("Europe/Berlin")


def berlin(*args: int) -> datetime:
    return datetime(*args, tzinfo=BERLIN)


def refusal(schedule: UpdateSchedule, now: datetime) -> dict[str, list[str]]:
    try:
        validate_schedule(schedule, now)
    except ValidationError as exc:
        return exc.message_dict
    return {}


# --- validation does not depend on when one saves ----------------------------------------


@pytest.mark.parametrize(
    ("cron", "download_cron", "valid"),
    [
        (
            "0 3 * * 0",
            "0 4 * * 6",
            True,
        ),  # Saturday's download for Sunday's update: the old check said no after Sat 04:00
        ("0 3 1 * *", "0 2 * * *", True),  # daily downloads, a monthly update
        ("0 3 * * 0", "0 4 * * 0", True),  # a download right after each update, for the next
        ("0 3 * * *", "0 4 * * 0", False),  # daily updates, a weekly download
        ("0 3 * * *", "30 2 * * *", False),  # 02:30 falls into the spring gap: 03:30, after the update
    ],
)
def test_validation_gives_the_same_answer_at_every_time_of_day(make_node, cron, download_cron, valid):
    schedule = UpdateSchedule(name="s", node=make_node("gw"), cron=cron, download_cron=download_cron)
    schedule.timezone = "Europe/Berlin"
    answers = {bool(refusal(schedule, berlin(2027, 1, 4) + timedelta(minutes=20 * i))) for i in range(3 * 24 * 7)}
    assert answers == {not valid}, "one answer all week, every 20 minutes"


def test_a_download_pushed_past_its_update_by_the_spring_gap_is_named(make_node):
    schedule = UpdateSchedule(
        name="s", node=make_node("gw"), cron="0 3 * * *", download_cron="30 2 * * *", timezone="Europe/Berlin"
    )
    (message,) = refusal(schedule, berlin(2027, 1, 4, 12))["download_cron"]
    assert "The update at 2027-03-28 03:00 CEST has no download of its own" in message
    assert "the next download comes at 2027-03-28 03:30 CEST" in message


def test_a_download_lead_longer_than_the_time_between_updates_is_refused(make_node):
    schedule = UpdateSchedule(name="s", node=make_node("gw"), cron="0 3 * * *", download_lead=timedelta(hours=25))
    assert "shorter download lead" in refusal(schedule, berlin(2027, 1, 4, 12))["download_lead"][0]


# --- time zones ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("posixrules", "is not a time zone"),
        ("Factory", "is not the time zone of a place"),
        ("localtime", "is not the time zone of a place"),
        ("right/UTC", "is not a time zone"),
        ("posix/Europe/Berlin", "is not a time zone"),
        ("europe/berlin", "is not a time zone"),
        ("../../etc/passwd", "is not a time zone"),
        ("Europe/Kiev", "is an old name of Europe/Kyiv: use Europe/Kyiv"),
    ],
)
def test_only_canonical_iana_zones_are_accepted(name, why, monkeypatch):
    with pytest.raises(ValueError, match=why):
        canonical_zone(name)
    from agent.config import AgentConfig

    monkeypatch.setenv("TGP_TIME_ZONE", name)
    with pytest.raises(ConfigError, match=f"TGP_TIME_ZONE: .*{why}"):
        AgentConfig.from_env()


def test_canonical_zones_pass():
    for name in ("Europe/Berlin", "Etc/UTC", "America/Argentina/Buenos_Aires"):
        assert canonical_zone(name).key == name


# --- DST: distinct, documented instants --------------------------------------------------


def test_a_time_in_the_spring_gap_moves_forward_by_the_gap_and_the_download_stays_an_hour_ahead(make_node):
    schedule = UpdateSchedule(name="s", node=make_node("gw"), cron="30 2 * * *", timezone="Europe/Berlin")
    pairs = upcoming(schedule, berlin(2027, 3, 27, 12), 2)
    (download, update), (next_download, next_update) = pairs
    assert update.astimezone(BERLIN) == berlin(2027, 3, 28, 3, 30), "02:30 does not exist: 03:30 summer time"
    assert update - download == timedelta(hours=1), "the update instant minus the lead"
    assert download.astimezone(BERLIN) == berlin(2027, 3, 28, 1, 30)
    assert next_update.astimezone(BERLIN) == berlin(2027, 3, 29, 2, 30)


def test_a_repeated_autumn_time_fires_once_at_its_first_occurrence(make_node):
    schedule = UpdateSchedule(name="s", node=make_node("gw"), cron="30 2 * * *", timezone="Europe/Berlin")
    updates = [update for _, update in upcoming(schedule, berlin(2027, 10, 30, 12), 2)]
    assert updates[0] == datetime(2027, 10, 31, 0, 30, tzinfo=UTC), "02:30 summer time (UTC+2), not an hour later"
    assert updates[1] == datetime(2027, 11, 1, 1, 30, tzinfo=UTC)


def test_wall_clock_times_that_become_one_instant_fire_once(make_node):
    schedule = UpdateSchedule(name="s", node=make_node("gw"), cron="0 2,3 28 3 *", timezone="Europe/Berlin")
    updates = [update for _, update in upcoming(schedule, berlin(2027, 3, 27), 3)]
    assert updates[0] == datetime(2027, 3, 28, 1, 0, tzinfo=UTC), "02:00 (in the gap) and 03:00 are one instant"
    assert updates[1].year == 2028


def test_a_cluster_update_entry_fires_its_load_balancer_lead_before_the_update_instant(make_node):
    cluster = Cluster.objects.create(name="c-dst", lb_lead_time=timedelta(minutes=90))
    schedule = UpdateSchedule(name="s", cluster=cluster, cron="30 2 * * *", timezone="Europe/Berlin")
    update = next_firing(schedule, "update", berlin(2027, 3, 27, 12))
    download = next_firing(schedule, "download", berlin(2027, 3, 27, 12))
    assert update and download and update.update_at == download.update_at == berlin(2027, 3, 28, 3, 30)
    assert update.at == update.update_at - timedelta(minutes=90)
    assert download.at == download.update_at - timedelta(hours=1)


# --- firing: one run per update, no run more than one download ahead ------------------------


@pytest.fixture
def monthly(make_node, releases, settings):
    settings.TGP_REPO_URL = "http://127.0.0.1:9/"  # nothing listens: the known releases are used
    node = make_node("gw")
    schedule = UpdateSchedule.objects.create(
        name="monthly", node=node, cron="0 3 1 * *", download_cron="0 2 * * *", timezone="Europe/Berlin"
    )
    # The second update from now: a month of daily downloads ahead of it.
    first = next_firing(schedule, "update", timezone.now())
    assert first is not None
    update = next_firing(schedule, "update", first.at)
    assert update is not None and update.update_at is not None
    return node, schedule, update.update_at


def test_a_daily_download_before_a_monthly_update_only_downloads(monthly, django_capture_on_commit_callbacks):
    node, schedule, update_at = monthly
    early = update_at - timedelta(days=5, hours=1)
    with django_capture_on_commit_callbacks(execute=False):
        result = scheduled.fire(schedule.pk, "download", early)
    assert "download only" in result
    run = UpdateRun.objects.get(node=node)
    assert run.trigger == "download" and run.scheduled_for is None
    assert list(run.steps.values_list("name", flat=True)) == ["download"]
    node.refresh_from_db()
    assert not node.maintenance_mode, "users keep working; Auto-Updates are not refused for weeks"

    UpdateRun.objects.filter(pk=run.pk).update(state="succeeded")  # the download ran meanwhile
    last = update_at - timedelta(hours=1)
    with django_capture_on_commit_callbacks(execute=False):
        result = scheduled.fire(schedule.pk, "download", last)
    scheduled_run = UpdateRun.objects.get(node=node, trigger="scheduled")
    assert scheduled_run.scheduled_for == update_at, result
    node.refresh_from_db()
    assert node.maintenance_mode


def test_a_firing_arms_its_entry_for_the_next_one(monthly, django_capture_on_commit_callbacks):
    node, schedule, update_at = monthly
    early = update_at - timedelta(days=5, hours=1)
    with django_capture_on_commit_callbacks(execute=False):
        scheduled.fire(schedule.pk, "download", early)
    schedule.refresh_from_db()
    assert schedule.download_task.clocked.clocked_time == early + timedelta(days=1)
    assert schedule.download_task.enabled and schedule.download_task.total_run_count == 0


def test_an_entry_armed_for_a_firing_that_no_longer_exists_fires_nothing(monthly):
    node, schedule, update_at = monthly
    assert scheduled.fire(schedule.pk, "download", update_at - timedelta(minutes=17)).startswith("no firing")
    assert not UpdateRun.objects.exists()


def test_a_lost_firing_is_armed_again(make_node):
    schedule = UpdateSchedule.objects.create(name="s", node=make_node("gw"), cron="0 3 * * *")
    now = timezone.now()
    assert rearm_overdue(now) == 0, "entries armed for the future are left alone"
    lost = next_firing(schedule, "download", now - timedelta(hours=30))
    assert lost is not None
    schedule.download_task.clocked.clocked_time = lost.at  # beat fired it, the task never ran
    schedule.download_task.clocked.save()
    later = lost.at + timedelta(minutes=10)
    assert rearm_overdue(later) == 1
    schedule.refresh_from_db()
    assert schedule.download_task.clocked.clocked_time == lost.at, "within LATE_FIRE: that firing once more"
    assert rearm_overdue(lost.at + LATE_FIRE + timedelta(minutes=1)) == 1
    schedule.refresh_from_db()
    assert schedule.download_task.clocked.clocked_time == lost.at + timedelta(days=1), "too late: the next one"
