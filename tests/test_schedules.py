"""Schedules: one pair of beat entries each, kept in step with the schedule; bad
input is refused with a clear error and changes nothing; firing twice starts
nothing twice."""

from __future__ import annotations

import json
from datetime import timedelta
from zoneinfo import ZoneInfo

import pytest
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import PeriodicTask, PeriodicTasks

from nodes.models import Cluster, Node
from updates import scheduled
from updates.models import UpdateRun, UpdateSchedule
from updates.schedules import set_time_control

pytestmark = pytest.mark.django_db


@pytest.fixture
def cluster(make_node):
    cluster = Cluster.objects.create(name="c1", max_parallel_updates=1)
    for _ in range(3):
        make_node("c1n", cluster=cluster)
    return cluster


def entries(schedule):
    schedule.refresh_from_db()
    return schedule.download_task, schedule.update_task


def local_firing(task, tz="Europe/Berlin"):
    """(weekday, "HH:MM") of when a one-off entry fires, in the schedule's zone."""
    assert task.one_off and task.enabled and task.crontab is None
    at = task.clocked.clocked_time.astimezone(ZoneInfo(tz))
    assert json.loads(task.kwargs)["at"] == task.clocked.clocked_time.isoformat(), "the firing is in its kwargs"
    return at.strftime("%a"), at.strftime("%H:%M")


def local_firing_at(at, tz="Europe/Berlin"):
    local = at.astimezone(ZoneInfo(tz))
    return local.strftime("%a"), local.strftime("%H:%M")


def test_a_cluster_schedule_owns_exactly_one_pair_of_beat_entries(cluster):
    schedule = UpdateSchedule.objects.create(name="weekly", cluster=cluster, cron="0 3 * * 0", timezone="Europe/Berlin")
    assert PeriodicTask.objects.filter(task__startswith="control.scheduled_").count() == 2
    download, update = entries(schedule)
    assert (download.task, update.task) == ("control.scheduled_download", "control.scheduled_update")
    assert download.queue == update.queue == "control"
    assert local_firing(download) == ("Sun", "02:00"), "the download starts 1 hour before the update"
    # The cluster's nodes leave the load balancer (one slot at a time) its lead time before the update.
    assert local_firing(update) == ("Sun", "02:00")
    assert update.clocked.clocked_time - timezone.now() <= timedelta(days=7), "armed for the next one"


def test_a_single_system_updates_at_the_window_and_downloads_ahead(make_node):
    node = make_node("gw")
    schedule = UpdateSchedule.objects.create(
        name="night", node=node, cron="30 1 * * 1-5", download_lead=timedelta(hours=3)
    )
    download, update = entries(schedule)
    assert local_firing(update)[0] in {"Mon", "Tue", "Wed", "Thu", "Fri"}
    assert local_firing(update)[1] == "01:30"
    assert local_firing(download)[1] == "22:30", "3 hours earlier is the evening before"
    # The download is armed for the update 3 hours after it: the next one, or, from 22:30 to
    # 01:30 (its download time has passed), the one after. (Held at any time of day.)
    downloads_for = download.clocked.clocked_time + timedelta(hours=3)
    assert local_firing_at(downloads_for) in {(day, "01:30") for day in ("Mon", "Tue", "Wed", "Thu", "Fri")}
    assert downloads_for >= update.clocked.clocked_time
    assert downloads_for - update.clocked.clocked_time < timedelta(days=4), "no occurrence skipped (Fri -> Mon)"


def test_changing_a_schedule_arms_its_entries_again_instead_of_adding_more(make_node):
    schedule = UpdateSchedule.objects.create(name="s", node=make_node("gw"), cron="0 3 * * 0")
    schedule.cron = "0 4 * * 6"
    schedule.save()
    assert local_firing(entries(schedule)[1]) == ("Sat", "04:00")
    assert PeriodicTask.objects.filter(task__startswith="control.scheduled_").count() == 2


def test_a_one_off_schedule_uses_one_off_clocked_entries(make_node):
    at = timezone.now() + timedelta(days=1)
    schedule = UpdateSchedule.objects.create(name="once", node=make_node("gw"), run_at=at)
    download, update = entries(schedule)
    assert download.one_off and update.one_off
    assert update.clocked.clocked_time == at
    assert download.clocked.clocked_time == at - timedelta(hours=1)


def test_switching_time_control_off_in_bulk_disables_both_entries_and_tells_beat(make_node):
    schedules = [UpdateSchedule.objects.create(name=f"s{i}", node=make_node("gw"), cron="0 3 * * 0") for i in range(3)]
    before = PeriodicTasks.last_change()
    assert set_time_control(UpdateSchedule.objects.all(), False) == 3
    assert not PeriodicTask.objects.filter(task__startswith="control.scheduled_", enabled=True).exists()
    assert PeriodicTasks.last_change() > before, "beat reloads its schedule"
    assert set_time_control(UpdateSchedule.objects.filter(pk=schedules[0].pk), True) == 1
    assert PeriodicTask.objects.filter(task__startswith="control.scheduled_", enabled=True).count() == 2


def test_deleting_a_schedule_deletes_its_beat_entries(make_node):
    schedule = UpdateSchedule.objects.create(name="s", node=make_node("gw"), cron="0 3 * * 0")
    schedule.delete()
    assert not PeriodicTask.objects.filter(task__startswith="control.scheduled_").exists()


def _post(admin_client, **fields):
    data = {"name": "s", "timezone": "Europe/Berlin", "download_lead": "01:00:00", "time_control": "on", **fields}
    return admin_client.post(reverse("admin:updates_updateschedule_add"), data)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cron": "0 25 * * *"}, "not a valid cron expression"),
        ({"cron": "every sunday"}, "is not a cron expression"),
        ({"cron": "0 3 * * 0", "timezone": "Mars/Olympus"}, "is not a time zone"),
        ({"cron": "0 3 * * 0", "timezone": "posixrules"}, "is not a time zone"),
        ({"cron": "0 3 * * 0", "timezone": "Factory"}, "is not the time zone of a place"),
        ({"cron": "0 3 * * 0", "timezone": "localtime"}, "is not the time zone of a place"),
        ({"cron": "0 3 * * 0", "timezone": "right/UTC"}, "is not a time zone"),
        ({"cron": "0 3 * * 0", "timezone": "US/Eastern"}, "is an old name of America/New_York"),
        ({"cron": "0 3 30 2 *"}, "never fires"),
        ({"cron": "0 3 * * *", "download_cron": "30 2 * * *"}, "has no download of its own"),
        ({"cron": "0 3 1 * *", "download_only": "on", "download_cron": "0 2 * * *"}, "leave this empty"),
        ({"run_at_0": "2020-01-01", "run_at_1": "03:00:00"}, "This date lies in the past"),
        ({"cron": "0 3 * * 0", "download_lead": "-01:00:00"}, "The download must start before its update"),
        ({"cron": "0 3 * * *", "download_cron": "0 4 * * 0"}, "the download must come first"),
        ({"cron": "0 3 * * 0", "run_at_0": "2099-01-01", "run_at_1": "03:00:00"}, "not both"),
    ],
)
def test_bad_schedule_input_is_a_clear_form_error_and_saves_nothing(admin_client, make_node, fields, message):
    node = make_node("gw")
    response = _post(admin_client, node=node.pk, **fields)
    assert response.status_code == 200
    assert message in response.text
    assert not UpdateSchedule.objects.exists() and not PeriodicTask.objects.filter(name__startswith="tgpadmin").exists()


def test_a_cluster_node_cannot_get_a_schedule_of_its_own(admin_client, cluster):
    node = Node.objects.filter(cluster=cluster).first()
    assert UpdateSchedule._meta.get_field("node").get_limit_choices_to() == {"cluster__isnull": True}
    schedule = UpdateSchedule(name="x", node=node, cron="0 3 * * 0")
    with pytest.raises(Exception, match="schedule the cluster instead"):
        schedule.full_clean()


def test_the_admin_warns_when_a_cluster_has_more_nodes_than_its_cap(admin_client, cluster):
    response = _post(admin_client, cluster=cluster.pk, cron="0 3 * * 0")
    assert response.status_code == 302
    page = admin_client.get(response["Location"])
    assert "has 3 nodes and allows 1 at a time" in page.text


def test_no_updates_available_is_logged_and_starts_nothing(make_node, releases, settings):
    settings.TGP_REPO_URL = "http://127.0.0.1:9/"  # nothing listens: the known releases are used
    node = make_node("gw", version="2.2.0")
    Node.objects.filter(pk=node.pk).update(installed_version="2.2.0")
    schedule = UpdateSchedule.objects.create(name="s", node=node, run_at=timezone.now() + timedelta(hours=2))
    scheduled.fire(schedule.pk, "download")
    schedule.refresh_from_db()
    assert f"{node}: no updates available" in schedule.last_result
    assert not UpdateRun.objects.exists()


def test_firing_the_same_entry_twice_starts_one_run(make_node, releases, settings, django_capture_on_commit_callbacks):
    settings.TGP_REPO_URL = "http://127.0.0.1:9/"
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0")
    schedule = UpdateSchedule.objects.create(name="s", node=node, run_at=timezone.now() + timedelta(hours=2))
    with django_capture_on_commit_callbacks(execute=False):
        scheduled.fire(schedule.pk, "download")
        scheduled.fire(schedule.pk, "download")  # a second beat
    run = UpdateRun.objects.get(node=node)
    assert run.trigger == "scheduled" and run.scheduled_for == schedule.run_at


def test_time_control_off_fires_nothing(make_node, releases):
    node = make_node("gw")
    schedule = UpdateSchedule.objects.create(
        name="s", node=node, run_at=timezone.now() + timedelta(hours=2), time_control=False
    )
    assert scheduled.fire(schedule.pk, "download") == "time control is off"
    assert not UpdateRun.objects.exists()


def test_a_firing_imports_the_releases_only_when_the_targets_version_is_new(
    tmp_path, settings, django_assert_max_num_queries
):
    # 500 schedules due in the same minute: one import, not 500 (bench/beat_lag.py).
    from tests.conftest import Repo
    from tests.servers import RepoServer
    from updates.models import Package, Release

    repo = Repo(tmp_path / "repo")
    with RepoServer(repo.dir) as server:
        settings.TGP_REPO_URL, settings.TGP_REPO_ROOT_FILE = server.url, repo.root_file
        assert scheduled.refresh_releases() == "targets version 1; "
        Package.objects.filter(release__version="2.2.0").delete()  # marks what an import would restore
        with django_assert_max_num_queries(1):
            assert scheduled.refresh_releases() == "targets version 1; "
        assert not Package.objects.filter(release__version="2.2.0").exists()

        repo.publish()  # a new publication: targets version 2
        assert scheduled.refresh_releases() == "targets version 2; "
    assert Package.objects.filter(release__version="2.2.0").exists()
    assert set(Release.objects.values_list("index_serial", flat=True)) == {2}


def test_the_schedule_page_shows_the_next_download_and_update_instants_with_their_offsets(admin_client, make_node):
    schedule = UpdateSchedule.objects.create(
        name="s", node=make_node("gw"), cron="30 2 * * *", timezone="Europe/Berlin"
    )
    page = admin_client.get(reverse("admin:updates_updateschedule_change", args=[schedule.pk]))
    assert page.status_code == 200
    assert page.text.count("download ") >= 6 and "→ update" in page.text
    assert "02:30 CE" in page.text and "01:30 CE" in page.text and "(UTC+0" in page.text
