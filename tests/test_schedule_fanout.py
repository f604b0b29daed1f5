"""A schedule's firing fans out to all its nodes at once (issue 16): the queries of a
firing do not grow with the nodes, firing twice still starts nothing twice, refusals
are logged per node, and firings due at the same instant share one look at the
repository. Nothing here runs a node: chains go to queues no agent serves, or are
captured before they are queued."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_celery_beat.models import ClockedSchedule, PeriodicTask, PeriodicTasks

from nodes.models import Cluster, Node
from tests.conftest import Repo, accept_key
from tests.servers import RepoServer
from updates import scheduled
from updates.models import Rollout, UpdateLock, UpdatePlan, UpdateRun, UpdateSchedule
from updates.runs import chains, start
from updates.runs.chains import QueueStarted, WakeAtPhase

pytestmark = pytest.mark.django_db
NOBODY = "http://127.0.0.1:9/"  # nothing listens: a firing uses the releases known


def cluster_of(count: int, *, cap: int = 2, lead: timedelta = timedelta(hours=1)) -> Cluster:
    cluster = Cluster.objects.create(
        name=f"fan-{uuid.uuid4().hex[:6]}", max_parallel_updates=cap, lb_lead_time=lead,
        expected_update=timedelta(minutes=10),
    )  # fmt: skip
    for i in range(count):
        accept_key(Node.objects.create(hostname=f"{cluster.name}-{i:03d}", cluster=cluster, installed_version="2.1.0"))
    return cluster


def fire_queries(schedule: UpdateSchedule, kind: str, capture, *, execute: bool) -> tuple[int, list]:
    with CaptureQueriesContext(connection) as queries, capture(execute=execute) as callbacks:
        scheduled.fire(schedule.pk, kind)
    return len(queries), callbacks


def test_firing_a_cluster_schedule_costs_the_same_queries_for_fifty_nodes_as_for_five(
    releases, settings, django_capture_on_commit_callbacks
):
    settings.TGP_REPO_URL = NOBODY
    counts = {}
    for size in (5, 50):
        cluster = cluster_of(size)
        schedule = UpdateSchedule.objects.create(
            name=f"s{size}", cluster=cluster, run_at=timezone.now() + timedelta(hours=3)
        )
        # The download entry plans the occurrence, starts every node's run and queues its
        # chain (executed: the query that leaves out runs ended before the commit counts too).
        download, _ = fire_queries(schedule, "download", django_capture_on_commit_callbacks, execute=True)
        assert UpdateRun.objects.filter(schedule=schedule).count() == size
        # The update entry carries each run on: here every node's time is still ahead, so
        # each gets its timer (captured: nobody may consume them).
        update, callbacks = fire_queries(schedule, "update", django_capture_on_commit_callbacks, execute=False)
        assert len([c for c in callbacks if isinstance(c, WakeAtPhase)]) == size
        counts[size] = (download, update)
    (download5, update5), (download50, update50) = counts[5], counts[50]
    # SQLite takes at most 999 parameters per query: 550 step rows are six inserts, not one.
    assert download50 <= download5 + 6, counts
    assert update50 == update5, counts
    assert download5 < 70, "some twenty queries per node before issue 16 (a batch's claim is a few more)"


def test_the_update_entry_fired_twice_carries_each_run_into_its_update_phase_once(
    releases, settings, django_capture_on_commit_callbacks
):
    settings.TGP_REPO_URL = NOBODY
    cluster = cluster_of(4, cap=4, lead=timedelta(0))
    run_at = timezone.now().replace(microsecond=0) - timedelta(seconds=30)  # its time has come
    lead = timedelta(minutes=1)
    schedule = UpdateSchedule.objects.create(name="now", cluster=cluster, run_at=run_at, download_lead=lead)
    with django_capture_on_commit_callbacks(execute=False) as first:
        scheduled.fire(schedule.pk, "update", run_at)
    with django_capture_on_commit_callbacks(execute=False) as second:
        scheduled.fire(schedule.pk, "update", run_at)  # a second beat
        scheduled.fire(schedule.pk, "download", run_at - lead)  # and the download entry, late
    runs = UpdateRun.objects.filter(schedule=schedule)
    assert runs.count() == 4 and all(run.update_phase_started for run in runs)
    chains = [chain for c in first if isinstance(c, QueueStarted) for chain in c.chains]
    assert sorted(chain.run_id for chain in chains) == sorted(run.pk for run in runs), "one chain per node"
    assert not [c for c in second if isinstance(c, QueueStarted)], "nothing queued again"
    schedule.refresh_from_db()
    assert schedule.last_result.endswith(
        "; ".join(f"{run.node}: run {run.pk}" for run in runs.order_by("node__hostname"))
    )


def test_a_phase_timer_that_finds_its_run_carried_on_already_costs_one_query_and_queues_nothing(
    releases, settings, django_capture_on_commit_callbacks
):
    # A fleet-wide update: every download arms a timer for its run's update phase, and
    # the update entry carries the runs on first; thousands of timers then come due at
    # the busiest instants with nothing left to do.
    settings.TGP_REPO_URL = NOBODY
    schedule = UpdateSchedule.objects.create(
        name="now", cluster=cluster_of(2, cap=2, lead=timedelta(0)),
        run_at=timezone.now().replace(microsecond=0) - timedelta(seconds=30),
    )  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False):
        scheduled.fire(schedule.pk, "update", schedule.run_at)
    run = UpdateRun.objects.filter(schedule=schedule).first()
    assert run is not None and run.update_phase_started
    with CaptureQueriesContext(connection) as queries, django_capture_on_commit_callbacks(execute=False) as queued:
        assert not chains.start_update_phase(run.pk, arm=True)
    assert len(queries) == 1 and not queued


def test_a_second_start_of_the_same_update_time_starts_nothing_and_says_so(
    releases, make_node, django_capture_on_commit_callbacks
):
    # Two firings of one entry at the same moment: the second finds, under the nodes'
    # locks, the runs the first one committed (the one-run-per-node-and-slot constraint
    # is the last line, not the answer).
    nodes = [make_node("gw") for _ in range(3)]
    schedule = UpdateSchedule.objects.create(name="s", node=nodes[0], run_at=timezone.now() + timedelta(hours=2))
    slot = schedule.run_at
    targets = [(node, releases["2.2.0"], schedule) for node in nodes]
    with django_capture_on_commit_callbacks(execute=False):
        first = start.start_scheduled(targets, trigger=UpdateRun.Trigger.SCHEDULED, scheduled_for=slot)
        second = start.start_scheduled(targets, trigger=UpdateRun.Trigger.SCHEDULED, scheduled_for=slot)
    assert all(isinstance(outcome, UpdateRun) for outcome in first)
    assert all(isinstance(outcome, start.AlreadyStarted) for outcome in second), second
    assert UpdateRun.objects.count() == 3
    assert f"run {first[0].pk}" in str(second[0])


def test_a_download_only_firing_of_a_cluster_logs_each_refusal_with_its_node(
    releases, settings, django_capture_on_commit_callbacks
):
    settings.TGP_REPO_URL = NOBODY
    cluster = cluster_of(3)
    locked, *others = list(cluster.nodes.order_by("hostname"))
    UpdateLock.objects.create(node=locked, reason="disk full")
    Node.objects.filter(pk=others[1].pk).update(installed_version="2.2.0")
    schedule = UpdateSchedule.objects.create(
        name="fetch", cluster=cluster, run_at=timezone.now() + timedelta(hours=2), download_only=True
    )
    with django_capture_on_commit_callbacks(execute=False):
        result = scheduled.fire(schedule.pk, "download")
    run = UpdateRun.objects.get(node=others[0])
    assert run.trigger == "download"
    assert f"{locked}: not downloaded: {locked} has an update lock (disk full)" in result
    assert f"{others[0]}: download run {run.pk} of 2.2.0" in result
    assert f"{others[1]}: no updates available" in result
    assert not Node.objects.filter(maintenance_mode=True).exists(), "a download only: users keep working"


@pytest.fixture
def repository(tmp_path, settings):
    repo = Repo(tmp_path / "repo")
    with RepoServer(repo.dir) as server:
        settings.TGP_REPO_URL, settings.TGP_REPO_ROOT_FILE = server.url, repo.root_file
        yield repo, server


def looks(server: RepoServer) -> int:
    return sum(r["path"].endswith("timestamp.json") for r in server.behaviour.requests)


def test_firings_due_at_one_instant_share_one_look_at_the_repository_and_a_later_one_looks_again(
    repository, make_node, django_capture_on_commit_callbacks
):
    repo, server = repository
    lead = timedelta(minutes=1)
    due = timezone.now().replace(microsecond=0) - timedelta(seconds=5)
    schedules = [
        UpdateSchedule.objects.create(name=f"s{i}", node=make_node("gw"), run_at=due + lead, download_lead=lead)
        for i in range(3)
    ]
    with django_capture_on_commit_callbacks(execute=False):
        results = [scheduled.fire(s.pk, "download", due) for s in schedules]
    assert looks(server) == 1, "three firings due at one instant: one look"
    assert all(result.startswith("targets version 1; download for") for result in results), results
    assert UpdateRun.objects.count() == 3

    repo.publish()  # targets version 2, after that look: a firing due now must see it
    later = timezone.now()
    schedule = UpdateSchedule.objects.create(name="later", node=make_node("gw"), run_at=later + lead,
                                             download_lead=lead)  # fmt: skip
    with django_capture_on_commit_callbacks(execute=False):
        assert scheduled.fire(schedule.pk, "download", later).startswith("targets version 2; ")
    assert looks(server) == 2


def test_a_failed_look_is_shared_by_the_firings_due_before_it(settings):
    settings.TGP_REPO_URL = f"{NOBODY}{uuid.uuid4().hex}/"  # a repository of this test alone
    due = timezone.now()
    first = scheduled.releases_as_of(due)
    assert first.startswith("repository not reachable")
    assert scheduled._Looks.last is not None and scheduled._Looks.last.began >= due
    began = scheduled._Looks.last.began
    assert scheduled.releases_as_of(due) == first and scheduled._Looks.last.began == began, "not looked again"
    assert scheduled.releases_as_of(timezone.now()).startswith("repository not reachable")
    assert scheduled._Looks.last.began > began, "a firing due after the look looks again"


def test_a_firing_rearms_its_entry_and_tells_beat_without_rewriting_the_note_at_each_step(
    make_node, releases, settings, django_capture_on_commit_callbacks
):
    settings.TGP_REPO_URL = NOBODY
    schedule = UpdateSchedule.objects.create(name="weekly", node=make_node("gw"), cron="0 3 * * 0")
    armed = UpdateSchedule.objects.get(pk=schedule.pk).download_task
    before = PeriodicTasks.last_change()
    with CaptureQueriesContext(connection) as queries, django_capture_on_commit_callbacks(execute=False):
        scheduled.fire(schedule.pk, "download", armed.clocked.clocked_time)
    rearmed = UpdateSchedule.objects.select_related("download_task__clocked").get(pk=schedule.pk).download_task
    assert rearmed.pk != armed.pk and rearmed.enabled, "a fresh row, one beat never fired"
    assert rearmed.clocked.clocked_time - armed.clocked.clocked_time == timedelta(days=7)
    assert PeriodicTasks.last_change() > before, "beat reloads its schedule"
    notes = [q for q in queries.captured_queries if q["sql"].startswith('UPDATE "django_celery_beat_periodictasks"')]
    # One for the entry; django-celery-beat's clocked rows note their own creation and
    # deletion (a new instant, the old one left to no entry). Its saves and deletes of the
    # entry wrote four more.
    assert len(notes) <= 3, notes


def test_an_instant_with_two_clocked_rows_still_arms_its_entries(make_node):
    # Two control worker processes arming entries for the same instant at the same moment
    # may each make its clocked row (its time is not unique): every later arming must work.
    schedule, other = (
        UpdateSchedule.objects.create(name=f"weekly {i}", node=make_node("gw"), cron="0 3 * * 0") for i in range(2)
    )
    at = schedule.download_task.clocked.clocked_time
    assert other.download_task.clocked_id == schedule.download_task.clocked_id, "one row per instant"
    ClockedSchedule.objects.create(clocked_time=at)
    schedule.save()  # arms both entries again
    assert UpdateSchedule.objects.get(pk=schedule.pk).download_task.clocked.clocked_time == at


# --- schedules due at the same instant fire as one batch ----------------------------------


def singles_due(count: int, run_at, *, lead: timedelta = timedelta(hours=1)) -> list[UpdateSchedule]:
    """Single systems on 2.1.0, each with its own one-off schedule for `run_at`."""
    schedules = []
    for _ in range(count):
        node = Node.objects.create(hostname=f"one-{uuid.uuid4().hex[:8]}", installed_version="2.1.0")
        accept_key(node)
        schedules.append(
            UpdateSchedule.objects.create(name=node.hostname, node=node, run_at=run_at, download_lead=lead)
        )
    return schedules


def armed(schedule: UpdateSchedule, kind: str):
    task = getattr(UpdateSchedule.objects.select_related(f"{kind}_task__clocked").get(pk=schedule.pk), f"{kind}_task")
    return task.clocked.clocked_time if task.enabled else None


def queued_runs(callbacks) -> list[int]:
    return sorted(chain.run_id for c in callbacks if isinstance(c, QueueStarted) for chain in c.chains)


def test_the_first_firing_of_an_instant_starts_the_runs_of_every_schedule_due_then(
    releases, settings, django_capture_on_commit_callbacks
):
    settings.TGP_REPO_URL = NOBODY
    run_at = (timezone.now() + timedelta(hours=2)).replace(microsecond=0)
    due = singles_due(4, run_at)
    later = singles_due(1, run_at + timedelta(minutes=1))[0]  # due a minute later: not now
    UpdateSchedule.objects.filter(pk=due[3].pk).update(time_control=False)  # switched off: fires nothing
    # Beat has sent this one's entry already (and disabled it, a one-off): its task is still queued.
    PeriodicTask.objects.filter(pk=due[2].download_task_id).update(enabled=False, total_run_count=1)
    at = armed(due[0], "download")
    assert at == run_at - timedelta(hours=1) and armed(due[1], "download") == at

    with django_capture_on_commit_callbacks(execute=False) as first:
        result = scheduled.fire(due[0].pk, "download", at)
    runs = {run.schedule_id: run for run in UpdateRun.objects.all()}
    assert set(runs) == {due[0].pk, due[1].pk, due[2].pk}, "the three schedules due then, and only they"
    assert all(run.scheduled_for == run_at and run.trigger == "scheduled" for run in runs.values())
    assert queued_runs(first) == sorted(run.pk for run in runs.values()), "each run's chain queued once"
    assert result.endswith(f"{due[0].node}: run {runs[due[0].pk].pk} to 2.2.0")
    for schedule in due[1:3]:
        schedule.refresh_from_db()
        assert schedule.last_result.endswith(f"{schedule.node}: run {runs[schedule.pk].pk} to 2.2.0")
    assert armed(due[1], "download") == at, "its own entry is still armed: it re-arms itself"

    # The others' own entries fire next: they start nothing again, keep their result,
    # and arm themselves for their next firing (a one-off schedule has none).
    with django_capture_on_commit_callbacks(execute=False) as rest:
        for schedule in due[1:3]:
            assert "fired already" in scheduled.fire(schedule.pk, "download", at)
            assert armed(schedule, "download") is None
            schedule.refresh_from_db()
            assert schedule.last_result.endswith(f"run {runs[schedule.pk].pk} to 2.2.0")
    assert not queued_runs(rest) and UpdateRun.objects.count() == 3
    assert not UpdateRun.objects.filter(schedule=later).exists()
    assert armed(later, "download") == at + timedelta(minutes=1)


def test_a_second_beat_of_a_fired_entry_starts_nothing_and_keeps_its_result(
    releases, settings, django_capture_on_commit_callbacks
):
    settings.TGP_REPO_URL = NOBODY
    (schedule,) = singles_due(1, (timezone.now() + timedelta(hours=2)).replace(microsecond=0))
    at = armed(schedule, "download")
    with django_capture_on_commit_callbacks(execute=False):
        scheduled.fire(schedule.pk, "download", at)
    schedule.refresh_from_db()
    first = schedule.last_result
    with django_capture_on_commit_callbacks(execute=False) as again:
        assert "fired already" in scheduled.fire(schedule.pk, "download", at)
    assert not queued_runs(again)
    schedule.refresh_from_db()
    assert schedule.last_result == first, "the result of the firing that started the run"


def test_a_batch_of_forty_schedules_costs_about_the_queries_of_five(
    releases, settings, django_capture_on_commit_callbacks
):
    settings.TGP_REPO_URL = NOBODY
    counts = {}
    for i, size in enumerate((5, 40)):
        run_at = (timezone.now() + timedelta(hours=2 + i)).replace(microsecond=0)
        due = singles_due(size, run_at)
        with CaptureQueriesContext(connection) as queries, django_capture_on_commit_callbacks(execute=False):
            scheduled.fire(due[0].pk, "download", armed(due[0], "download"))
        assert UpdateRun.objects.filter(scheduled_for=run_at).count() == size
        counts[size] = len(queries)
    # SQLite takes at most 999 parameters per query: 40 runs' rows and their 280 steps are a
    # few inserts more. A firing per schedule cost 32 queries each.
    assert counts[40] <= counts[5] + 12, counts


def test_cluster_schedules_due_at_one_instant_each_get_their_plan_and_rollout(
    releases, settings, django_capture_on_commit_callbacks
):
    settings.TGP_REPO_URL = NOBODY
    run_at = (timezone.now() + timedelta(hours=3)).replace(microsecond=0)
    clusters = [cluster_of(3), cluster_of(2)]
    schedules = [UpdateSchedule.objects.create(name=c.name, cluster=c, run_at=run_at) for c in clusters]
    (single,) = singles_due(1, run_at)
    with django_capture_on_commit_callbacks(execute=False):
        scheduled.fire(schedules[0].pk, "download", armed(schedules[0], "download"))
    for schedule, cluster in zip(schedules, clusters, strict=True):
        (rollout,) = Rollout.objects.filter(schedule=schedule)
        assert rollout.cluster == cluster and rollout.scheduled_for == run_at
        assert set(rollout.runs.values_list("node", flat=True)) == set(cluster.nodes.values_list("pk", flat=True))
        assert UpdatePlan.objects.filter(schedule=schedule, occurrence=run_at).count() == 1
    assert UpdateRun.objects.get(schedule=single).rollout is None, "a single system's run is in no rollout"


def test_a_schedule_that_fails_is_left_to_its_own_firing_and_the_others_of_its_instant_start(
    releases, settings, monkeypatch, django_capture_on_commit_callbacks
):
    settings.TGP_REPO_URL = NOBODY
    run_at = (timezone.now() + timedelta(hours=3)).replace(microsecond=0)
    broken = UpdateSchedule.objects.create(name="broken", cluster=cluster_of(2), run_at=run_at)
    first, second = singles_due(2, run_at)
    real = scheduled.ensure_plan

    def ensure_plan(schedule, occurrence):
        if schedule.pk == broken.pk:
            raise RuntimeError("a plan that cannot be made")
        return real(schedule, occurrence)

    monkeypatch.setattr(scheduled, "ensure_plan", ensure_plan)
    at = armed(first, "download")
    with django_capture_on_commit_callbacks(execute=False):
        scheduled.fire(first.pk, "download", at)
    assert set(UpdateRun.objects.values_list("schedule", flat=True)) == {first.pk, second.pk}
    assert UpdateSchedule.objects.get(pk=broken.pk).download_fired_for is None, "not marked fired"
    assert not UpdatePlan.objects.exists(), "nothing of it kept"
    # Its own entry fires it, and fails as it would alone.
    with pytest.raises(RuntimeError), django_capture_on_commit_callbacks(execute=False):
        scheduled.fire(broken.pk, "download", at)
    with django_capture_on_commit_callbacks(execute=False):
        assert "fired already" in scheduled.fire(second.pk, "download", at)
