"""The run's rules, one transition at a time: duplicates and late reports change
nothing they should not, and only the right releases may start."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from nodes.models import Node
from updates.models import UpdateLock, UpdateRun, UpdateStep
from updates.runs import end, recovery, reports, snapshots, start
from updates.runs.chains import QueueChain

pytestmark = pytest.mark.django_db


@pytest.fixture
def run(make_node, releases, django_capture_on_commit_callbacks):
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0", boot_id="boot-1", agent_instance="agent-1")
    with django_capture_on_commit_callbacks(execute=False):
        return start.start_update(Node.objects.get(pk=node.pk), releases["2.2.0"])


def step(run, name):
    return UpdateStep.objects.get(run=run, name=name)


def test_a_late_success_report_still_lands_after_the_run_completed(run):
    reports.record_step(run.pk, "resume", "started")
    assert end.complete_run(run.pk)
    reports.record_step(run.pk, "resume", "succeeded")
    assert step(run, "resume").state == "succeeded"


def test_a_step_whose_report_was_lost_shows_succeeded_once_the_run_completes(run):
    # The agent was killed after the chain's next message went out and before the
    # step's own report did (agent.tasks.NodeStep sends it after the task returns).
    for name in ["notify", "download", "install", "reboot", "verify", "resume"]:
        reports.record_step(run.pk, name, "succeeded")
    assert step(run, "drain").state == "pending"
    assert end.complete_run(run.pk)
    assert set(run.steps.values_list("state", flat=True)) == {"succeeded"}


def test_late_progress_after_a_failure_changes_nothing(run):
    reports.record_step(run.pk, "download", "started")
    end.fail_run(run.pk, "boom")
    reports.record_step(run.pk, "download", "progress", bytes_done=10, bytes_total=100)
    assert step(run, "download").bytes_done == 0


def test_a_started_report_arriving_after_success_does_not_reopen_the_step(run):
    reports.record_step(run.pk, "notify", "succeeded")
    reports.record_step(run.pk, "notify", "started")
    assert step(run, "notify").state == "succeeded"


def test_a_failure_reported_twice_sets_one_lock(run):
    reports.record_step(run.pk, "download", "failed", detail="bad hash")
    reports.record_step(run.pk, "download", "failed", detail="bad hash")
    assert UpdateLock.objects.filter(node=run.node, removed_at=None).count() == 1
    run.refresh_from_db()
    assert run.state == "failed" and run.error == "download: bad hash"


def test_completing_twice_is_a_no_op(run):
    assert end.complete_run(run.pk) is True
    assert end.complete_run(run.pk) is False


def test_a_second_start_on_the_same_node_is_refused(run, releases):
    with pytest.raises(start.UpdateRefused, match="already updating"):
        start.start_update(run.node, releases["2.2.0"])


def test_agent_restart_mid_step_requeues_the_run_from_that_step(run, django_capture_on_commit_callbacks):
    reports.record_step(run.pk, "notify", "succeeded")
    reports.record_step(run.pk, "download", "succeeded")
    reports.record_step(run.pk, "drain", "started")
    with django_capture_on_commit_callbacks(execute=False) as queued:
        recovery.node_reported(run.node.hostname, {"boot_id": "boot-1", "agent_instance": "agent-2"})
    assert queued == [QueueChain(run.pk, "drain")], "this run, again from the step its agent was in"


def test_a_crash_after_the_reboot_requeues_the_interrupted_step(run, django_capture_on_commit_callbacks):
    for name in ["notify", "download", "drain", "install", "reboot", "verify"]:
        reports.record_step(run.pk, name, "succeeded")
    recovery.node_reported(run.node.hostname, {"boot_id": "boot-2", "agent_instance": "agent-2"})  # the reboot
    reports.record_step(run.pk, "resume", "started")
    with django_capture_on_commit_callbacks(execute=False) as queued:
        recovery.node_reported(run.node.hostname, {"boot_id": "boot-2", "agent_instance": "agent-3"})  # a crash
    assert queued == [QueueChain(run.pk, "resume")]


def test_the_reboot_itself_does_not_requeue_the_reboot(run, django_capture_on_commit_callbacks):
    for name in ["notify", "download", "drain", "install"]:
        reports.record_step(run.pk, name, "succeeded")
    reports.record_step(run.pk, "reboot", "started")
    with django_capture_on_commit_callbacks(execute=False) as queued:
        recovery.node_reported(run.node.hostname, {"boot_id": "boot-2", "agent_instance": "agent-2"})
    assert queued == []


def test_heartbeats_from_the_same_agent_queue_nothing(run, django_capture_on_commit_callbacks):
    reports.record_step(run.pk, "download", "started")
    with django_capture_on_commit_callbacks(execute=False) as queued:
        recovery.node_reported(run.node.hostname, {"boot_id": "boot-1", "agent_instance": "agent-1"})
    assert queued == []


def test_only_a_catch_up_may_install_an_older_release(make_node, releases):
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0")
    node.refresh_from_db()
    with pytest.raises(start.UpdateRefused, match="older than the newest"):
        start.start_update(node, releases["2.1.0"])
    with pytest.raises(start.UpdateRefused, match="older than the newest"):
        start.start_update(node, releases["2.0.0"])
    with pytest.raises(start.UpdateRefused, match="oldstable release"):
        start.start_update(node, releases["2.2.0"], trigger=UpdateRun.Trigger.CATCHUP_FULL)
    run = start.start_update(node, releases["2.0.0"], trigger=UpdateRun.Trigger.CATCHUP_FULL)
    assert run.release.version == "2.0.0"


def test_an_unknown_node_report_is_ignored():
    assert snapshots.apply_snapshot("ghost", {"installed_version": "1.0"}) is None
    assert not Node.objects.exists()


def test_an_older_snapshot_processed_late_does_not_overwrite_a_newer_one(make_node):
    node = make_node("gw")
    snapshots.apply_snapshot(node.hostname, {"logon_enabled": True, "boot_id": "b"}, seq=2000)
    snapshots.apply_snapshot(node.hostname, {"logon_enabled": False, "boot_id": "b"}, seq=1000)
    node.refresh_from_db()
    assert node.logon_enabled is True
    assert node.last_seen is not None


def test_a_reboot_whose_report_and_verify_were_lost_is_carried_on_at_verify(
    run, django_capture_on_commit_callbacks, settings
):
    # Redis went down while the control worker held the reboot step's report and the
    # chain's verify: the node came back, and nothing would move the run on.
    for name in ["notify", "download", "drain", "install"]:
        reports.record_step(run.pk, name, "succeeded")
    reports.record_step(run.pk, "reboot", "started")
    Node.objects.filter(pk=run.node_id).update(boot_id="boot-2")
    quiet = timezone.now() - timedelta(seconds=settings.TGP_RECONCILE_AFTER + 1)
    UpdateRun.objects.filter(pk=run.pk).update(last_activity_at=quiet)

    with django_capture_on_commit_callbacks(execute=False) as queued:
        assert recovery.reconcile() == 1
    assert queued == [QueueChain(run.pk, "verify")]
