"""Time-controlled updates through real processes: beat fires the entries, the
control worker fans out, agents do the work. Lead times are shortened by the
schedule's own fields."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from nodes.models import Node
from tests.conftest import FlakyRepoServer, Repo, wait_for
from updates import scheduled
from updates.models import UpdateLock, UpdateRun, UpdateSchedule, UpdateStep

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workflow, pytest.mark.timeout(240)]


def test_beat_fires_download_then_update_of_a_one_off_schedule(demo_repo, make_node, agent_for, beat, state_dir):
    repo, _ = demo_repo
    repo.import_releases()
    node = make_node("gw", users=("alice",))
    agent_for(node)
    update_at = timezone.now() + timedelta(seconds=14)
    schedule = UpdateSchedule.objects.create(
        name="soon", node=node, run_at=update_at, download_lead=timedelta(seconds=8)
    )

    run = wait_for(lambda: UpdateRun.objects.filter(node=node).first(), 60, "the download entry to start a run")
    download = UpdateStep.objects.filter(run=run, name="download")
    wait_for(lambda: download.get().state == "succeeded", 60, "the download")
    assert download.get().finished_at < update_at, "downloaded ahead of the update time"
    assert json.loads((state_dir / node.hostname / "state.json").read_text())["sessions"], "users still working"

    wait_for(lambda: UpdateRun.objects.get(pk=run.pk).state != "running", 90, "the update run")
    run.refresh_from_db()
    assert run.state == "succeeded", run.error
    drain = UpdateStep.objects.get(run=run, name="drain")
    assert drain.started_at >= update_at - timedelta(seconds=1), "nobody is logged off before the update time"
    logged_off = json.loads((state_dir / node.hostname / "state.json").read_text())["logged_off"]
    notice = logged_off[0]["inbox"][0]["message"]
    assert f"logged off at {timezone.localtime(update_at):%Y-%m-%d %H:%M}" in notice, "the notice names the time"
    node.refresh_from_db()
    assert node.installed_version == "2.2.0" and node.logon_enabled and not node.maintenance_mode
    schedule.refresh_from_db()
    assert f"update for {timezone.localtime(update_at):%Y-%m-%d %H:%M}: {node}: run {run.pk}" in schedule.last_result


def _policy_setup(tmp_path, make_node, start_agent, fail_first, settings):
    repo = Repo(tmp_path / "repo")
    # The control plane looks at the index too (with the key it pins): one request per firing.
    settings.TGP_REPO_ROOT_FILE = repo.root_file
    repo.import_releases()
    node = make_node("gw")
    server = FlakyRepoServer(repo.dir, fail_first=fail_first).__enter__()
    # Retries without waiting: the policy counts attempts, the backoff is production's business.
    start_agent(node.hostname, repo_url=server.url, root=repo.root_file, TGP_DOWNLOAD_BACKOFF_MAX="0")
    wait_for(lambda: Node.objects.get(pk=node.pk).agent_instance, 60, "the agent")
    schedule = UpdateSchedule.objects.create(
        name="policy", node=node, run_at=timezone.now() + timedelta(hours=2), download_lead=timedelta(hours=1)
    )
    return node, schedule, server


def _update_time_is_now(schedule, run):
    # Instead of waiting two hours: the update time has come.
    now = timezone.now()
    UpdateSchedule.objects.filter(pk=schedule.pk).update(run_at=now)
    UpdateRun.objects.filter(pk=run.pk).update(scheduled_for=now)


def test_download_failure_policy_ten_attempts_flag_ten_more_then_lock_and_time_control_off(
    tmp_path, make_node, start_agent, control_worker, settings
):
    node, schedule, server = _policy_setup(tmp_path, make_node, start_agent, 10_000, settings)
    settings.TGP_REPO_URL = server.url
    scheduled.fire(schedule.pk, "download")
    run = UpdateRun.objects.get(node=node)
    wait_for(lambda: Node.objects.get(pk=node.pk).download_warning, 60, "the warning flag")
    assert server.refreshes == 10 + 1, "10 attempts by the node (and one look by the control plane)"
    run.refresh_from_db()
    assert run.state == "running" and not UpdateLock.objects.filter(node=node).exists()

    _update_time_is_now(schedule, run)
    scheduled.fire(schedule.pk, "update")
    wait_for(lambda: UpdateRun.objects.get(pk=run.pk).state == "failed", 60, "the run to fail")
    assert server.refreshes == 10 + 1 + 1 + 10, "exactly 10 more attempts"
    assert UpdateLock.objects.filter(node=node, removed_at=None).exists()
    schedule.refresh_from_db()
    assert not schedule.time_control and "failed twice" in schedule.disabled_reason
    assert not PeriodicTask.objects.filter(pk__in=[schedule.download_task_id, schedule.update_task_id], enabled=True)
    node.refresh_from_db()
    assert node.download_warning and node.maintenance_mode
    assert UpdateStep.objects.get(run=run, name="drain").state == "pending", "the update run was prevented"
    server.__exit__()


def test_download_warning_flag_stays_until_a_complete_download_then_clears(
    tmp_path, make_node, start_agent, control_worker, settings
):
    # The control plane's own look at the index is request 1; the node's attempts
    # are requests 2..11 (round 1) and 13.. (round 2): it recovers at its 13th attempt.
    node, schedule, server = _policy_setup(tmp_path, make_node, start_agent, 1 + 10 + 1 + 2, settings)
    settings.TGP_REPO_URL = server.url
    scheduled.fire(schedule.pk, "download")
    run = UpdateRun.objects.get(node=node)
    wait_for(lambda: Node.objects.get(pk=node.pk).download_warning, 60, "the warning flag")

    _update_time_is_now(schedule, run)
    scheduled.fire(schedule.pk, "update")
    wait_for(lambda: UpdateRun.objects.get(pk=run.pk).state != "running", 90, "the run to end")
    run.refresh_from_db()
    assert run.state == "succeeded", run.error
    node.refresh_from_db()
    assert not node.download_warning and node.installed_version == "2.2.0"
    assert schedule.__class__.objects.get(pk=schedule.pk).time_control
    server.__exit__()
