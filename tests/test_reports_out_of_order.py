"""One node's reports landing out of order (issue 16): two control workers process a
node's reports side by side, and under load a later step's report may be recorded
before an earlier one's. A step the node has begun means every step before it
succeeded: whoever carries the run on (a report, the update entry, a restarted
agent's heartbeat, the reconciler) goes on from there, not from a step the node did
already. Before, a fleet-wide update's nodes ran notify and the download a second time
before their drain. Nothing here runs a node: the reports are recorded in the order
under test, and the chains are captured before they are queued."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from nodes.models import Node
from updates import scheduled
from updates.models import UpdateRun, UpdateSchedule, UpdateStep
from updates.runs import recovery, reports, start
from updates.runs.chains import QueueChain, QueueStarted, resume_point

pytestmark = pytest.mark.django_db
NOBODY = "http://127.0.0.1:9/"  # nothing listens: a firing uses the releases known


@pytest.fixture
def scheduled_run(make_node, releases, settings, django_capture_on_commit_callbacks):
    """A single system's scheduled run whose download phase was started two hours ahead."""
    settings.TGP_REPO_URL = NOBODY
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0", boot_id="boot-1", agent_instance="agent-1")
    schedule = UpdateSchedule.objects.create(name="s", node=node, run_at=timezone.now() + timedelta(hours=2))
    with django_capture_on_commit_callbacks(execute=False):
        scheduled.fire(schedule.pk, "download")
    return UpdateRun.objects.get(schedule=schedule)


def update_time_has_come(run: UpdateRun) -> None:
    now = timezone.now()  # instead of waiting two hours
    assert run.schedule_id is not None
    UpdateSchedule.objects.filter(pk=run.schedule_id).update(run_at=now)
    UpdateRun.objects.filter(pk=run.pk).update(scheduled_for=now)


def state(run: UpdateRun, name: str) -> str:
    return UpdateStep.objects.get(run=run, name=name).state


def started_chains(callbacks) -> list[QueueChain]:  # noqa: ANN001
    return [chain for c in callbacks if isinstance(c, QueueStarted) for chain in c.chains]


def test_a_download_success_recorded_before_notifys_carries_the_run_on_after_the_download(
    scheduled_run, django_capture_on_commit_callbacks
):
    update_time_has_come(scheduled_run)
    with django_capture_on_commit_callbacks(execute=False) as queued:
        reports.record_step(scheduled_run.pk, "download", "succeeded")  # notify's report still queued
    assert queued == [QueueChain(scheduled_run.pk, "drain")], "from drain, not notify again"
    with django_capture_on_commit_callbacks(execute=False) as late:
        reports.record_step(scheduled_run.pk, "notify", "succeeded")
    assert not late and state(scheduled_run, "notify") == "succeeded", "the late report lands, and queues nothing"


def test_the_update_entry_leaves_a_begun_download_to_carry_its_run_on_though_notify_was_not_recorded(
    scheduled_run, django_capture_on_commit_callbacks
):
    reports.record_step(scheduled_run.pk, "download", "started")  # recorded before notify's success
    update_time_has_come(scheduled_run)
    with django_capture_on_commit_callbacks(execute=False) as fired:
        scheduled.fire(scheduled_run.schedule_id, "update")
    assert not started_chains(fired), "the download under way carries the run on, not a second chain from notify"
    with django_capture_on_commit_callbacks(execute=False) as queued:
        reports.record_step(scheduled_run.pk, "download", "succeeded")
    assert queued == [QueueChain(scheduled_run.pk, "drain")]


def test_the_update_entry_carries_a_downloaded_run_on_at_drain_whatever_notify_shows(
    scheduled_run, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False):
        reports.record_step(scheduled_run.pk, "download", "succeeded")  # before its time: it rests
    assert state(scheduled_run, "notify") == "pending"
    update_time_has_come(scheduled_run)
    with django_capture_on_commit_callbacks(execute=False) as fired:
        scheduled.fire(scheduled_run.schedule_id, "update")
    assert [(c.run_id, c.from_step) for c in started_chains(fired)] == [(scheduled_run.pk, "drain")]


def test_a_restarted_agent_resumes_at_the_step_it_was_in_though_an_earlier_report_was_lost(
    make_node, releases, django_capture_on_commit_callbacks
):
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0", boot_id="boot-1", agent_instance="agent-1")
    with django_capture_on_commit_callbacks(execute=False):
        run = start.start_update(Node.objects.get(pk=node.pk), releases["2.2.0"])
    reports.record_step(run.pk, "notify", "succeeded")
    reports.record_step(run.pk, "drain", "started")  # the download's report was lost
    with django_capture_on_commit_callbacks(execute=False) as queued:
        recovery.node_reported(node.hostname, {"boot_id": "boot-1", "agent_instance": "agent-2"})
    assert queued == [QueueChain(run.pk, "drain")], "not the download again"


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([("notify", "pending"), ("download", "pending")], ("notify", "pending")),
        ([("notify", "pending"), ("download", "running"), ("drain", "pending")], ("download", "running")),
        ([("notify", "pending"), ("download", "succeeded"), ("drain", "pending")], ("drain", "pending")),
        ([("notify", "succeeded"), ("download", "pending"), ("drain", "pending")], ("download", "pending")),
        ([("notify", "skipped"), ("download", "succeeded")], None),
    ],
)
def test_a_run_resumes_at_the_first_unfinished_step_from_the_furthest_begun(steps, expected):
    assert resume_point(steps) == (tuple(expected) if expected else None)
