"""Rollouts (issue 17): the runs of one start of several nodes, or of a cluster
schedule's occurrence, as one object. Grouping, progress, the state transitions and
what they refuse, pausing at the point where a node would be disrupted (its first
gate, its update phase) and waking on resume, cancelling the nodes not yet started,
the error threshold, and the page with its role checks. The database and Redis are
real; nothing runs a node except the one workflow test at the end."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from nodes import services
from nodes.models import Cluster, Node
from tests.conftest import accept_key, wait_for
from updates import scheduled
from updates.models import PlanEntry, Rollout, UpdateLock, UpdateRun, UpdateSchedule, UpdateStep
from updates.runs import chains, cluster_cap, end, recovery, rollouts
from updates.runs.chains import QueueChain, QueueStarted

pytestmark = pytest.mark.django_db
NOBODY = "http://127.0.0.1:9/"  # nothing listens: a firing uses the releases known
URL = reverse("admin:nodes_node_autoupdate")


def cluster_of(count: int, cap: int = 1) -> list[Node]:
    cluster = Cluster.objects.create(name=f"ro-{uuid.uuid4().hex[:6]}", max_parallel_updates=cap)
    return [node(f"{cluster.name}-{i}", cluster) for i in range(count)]


def node(hostname: str, cluster: Cluster | None = None) -> Node:
    made = Node.objects.create(hostname=hostname, cluster=cluster, installed_version="2.1.0", logged_in_users=["u"])
    accept_key(made)
    return made


def singles(count: int) -> list[Node]:
    return [node(f"gw-{uuid.uuid4().hex[:6]}") for _ in range(count)]


def schedule_of(cluster: Cluster) -> UpdateSchedule:
    """A one-off update in 3 hours: its download entry starts the runs, which then wait for their times."""
    return UpdateSchedule.objects.create(name="nightly", cluster=cluster, run_at=timezone.now() + timedelta(hours=3))


def start(nodes: list[Node], user=None) -> list[UpdateRun]:
    runs, refused = services.start_planned(services.plan_updates(nodes), user)
    assert not refused
    return sorted(runs, key=lambda run: run.node.hostname)


def step(run: UpdateRun, name: str) -> UpdateStep:
    return UpdateStep.objects.get(run=run, name=name)


def holders(nodes: list[Node]) -> list[str]:
    cluster = nodes[0].cluster
    return [h.node for h in cluster_cap.cluster_slots().holders(cluster.name)]


@pytest.fixture
def operator(client, staff, releases):
    client.force_login(staff("op", "update"))
    return client


# --- grouping -------------------------------------------------------------------------------


def test_a_selection_of_nodes_and_a_whole_cluster_each_start_one_rollout_of_their_runs(operator):
    three, cluster = singles(3), cluster_of(3)
    answers = [
        operator.post(URL, {"ids": ",".join(str(n.pk) for n in nodes), "confirm": "yes"}) for nodes in (three, cluster)
    ]
    selection, whole = Rollout.objects.order_by("pk")
    assert [answer.url for answer in answers] == [rollout.get_absolute_url() for rollout in (selection, whole)]
    assert set(selection.runs.values_list("node_id", flat=True)) == {n.pk for n in three}
    assert (selection.title, selection.cluster, selection.created_by.username) == (
        "Auto-Update of a selection (3 nodes)", None, "op"
    )  # fmt: skip
    assert set(whole.runs.values_list("node_id", flat=True)) == {n.pk for n in cluster}
    assert whole.cluster == cluster[0].cluster and whole.title == f"Auto-Update of cluster {whole.cluster} (3 nodes)"
    # A single start is a run of its own (a rollout of one would only repeat it).
    (alone,) = start(singles(1))
    assert alone.rollout is None and Rollout.objects.count() == 2


def test_a_cluster_schedules_occurrence_is_one_rollout_however_its_runs_start(releases, settings):
    settings.TGP_REPO_URL = NOBODY
    nodes = cluster_of(3)
    cluster = nodes[0].cluster
    schedule = schedule_of(cluster)
    scheduled.fire(schedule.pk, "download")
    node(f"{cluster.name}-late", cluster)  # joins the plan, and its run the occurrence's rollout, at the update entry
    scheduled.fire(schedule.pk, "update")
    (rollout,) = Rollout.objects.all()
    assert (rollout.schedule, rollout.scheduled_for, rollout.cluster) == (schedule, schedule.run_at, cluster)
    assert rollout.runs.count() == 4 == UpdateRun.objects.filter(schedule=schedule).count()
    # A single system's schedule, and a download-only one (no update: nothing to pause), group nothing.
    gw = singles(1)[0]
    single = UpdateSchedule.objects.create(name="gw", node=gw, run_at=timezone.now() + timedelta(hours=3))
    scheduled.fire(single.pk, "download")
    assert UpdateRun.objects.get(node=gw).rollout is None
    fetch = cluster_of(2)
    UpdateSchedule.objects.filter(pk=schedule_of(fetch[0].cluster).pk).update(download_only=True)
    scheduled.fire(UpdateSchedule.objects.get(cluster=fetch[0].cluster).pk, "download")
    assert list(UpdateRun.objects.filter(node__in=fetch).values_list("trigger", "rollout")) == [("download", None)] * 2
    assert Rollout.objects.count() == 1


# --- progress and states ---------------------------------------------------------------------


def test_progress_is_counted_from_the_runs_and_finished_is_derived(releases):
    runs = start(cluster_of(6))
    done, failed, cancelled, started = runs[:4]
    UpdateRun.objects.filter(pk=done.pk).update(state="succeeded")
    UpdateRun.objects.filter(pk=failed.pk).update(state="failed")
    UpdateRun.objects.filter(pk=cancelled.pk).update(state="cancelled")
    UpdateStep.objects.filter(run=started, name="slot").update(state="succeeded")  # took its slot: started
    rollout = Rollout.objects.get()
    assert rollout.progress == Rollout.objects.with_progress().get().progress, "the list's count is the page's"
    p = rollout.progress
    assert (p.done, p.running, p.waiting, p.failed, p.cancelled, p.total) == (1, 1, 2, 1, 1, 6)
    assert rollout.shown_state == "running"
    UpdateRun.objects.filter(state="running").update(state="succeeded")
    assert Rollout.objects.get().shown_state == "finished"


def test_transitions_move_only_from_the_states_they_allow(releases, staff, django_capture_on_commit_callbacks):
    op = staff("op", "update")
    start(cluster_of(2))
    rollout = Rollout.objects.get()
    with pytest.raises(rollouts.RolloutRefused, match="is running: it cannot be resumed"):
        rollouts.resume(rollout.pk, op)
    rollouts.pause(rollout.pk, op)
    with pytest.raises(rollouts.RolloutRefused, match="is paused: it cannot be paused"):
        rollouts.pause(rollout.pk, op)  # twice: the second changes nothing
    assert Rollout.objects.get().state_reason == "paused by op"
    with django_capture_on_commit_callbacks(execute=False) as queued:
        rollouts.resume(rollout.pk, op)
    assert queued == [rollouts.WakeRollout(rollout.pk)], "its waiting nodes are woken once it commits"
    rollouts.cancel(rollout.pk, op)
    for move in (rollouts.pause, rollouts.resume, rollouts.cancel):
        with pytest.raises(rollouts.RolloutRefused, match="is cancelled"):
            move(rollout.pk, op)
    finished = start(cluster_of(2))[0].rollout
    UpdateRun.objects.filter(rollout=finished).update(state="succeeded")
    with pytest.raises(rollouts.RolloutRefused, match="has finished"):
        rollouts.pause(finished.pk, op)
    assert Rollout.objects.get(pk=finished.pk).state == "running"


# --- pause at the gate, resume wakes ----------------------------------------------------------


def test_a_paused_rollouts_node_waits_in_line_holding_nothing_and_its_resume_wakes_it(
    releases, staff, django_capture_on_commit_callbacks
):
    nodes = cluster_of(2, cap=2)
    first, second = start(nodes)
    rollouts.pause(first.rollout_id, staff("op", "update"))
    with pytest.raises(cluster_cap.RolloutPaused):
        cluster_cap.take_slot(first.pk)
    assert holders(nodes) == [] and step(first, "slot").state == "running", "in line, no slot taken"
    assert "paused" in step(first, "slot").detail
    assert cluster_cap.wake_waiters(nodes[0].cluster) == 0, "a release does not wake it"
    with django_capture_on_commit_callbacks(execute=False) as queued:
        rollouts.resume(first.rollout_id, "op")
    assert queued == [rollouts.WakeRollout(first.rollout_id)]
    with django_capture_on_commit_callbacks(execute=False) as chained:
        assert rollouts.wake(first.rollout_id) == 1
    assert holders(nodes) == [first.node.hostname] and step(first, "slot").state == "succeeded"
    assert chained == [QueueChain(first.pk, "drain")]
    assert step(second, "slot").state == "pending", "a node not yet in line is not taken along"


def test_nodes_of_a_paused_rollout_take_no_free_slot_from_those_behind_them(releases, staff):
    nodes = cluster_of(4, cap=1)
    paused_a, paused_b = start(nodes[:2])
    other_c, other_d = start(nodes[2:])
    rollouts.pause(paused_a.rollout_id, staff("op", "update"))
    for run in (paused_a, paused_b):
        with pytest.raises(cluster_cap.RolloutPaused):
            cluster_cap.take_slot(run.pk)
    cluster_cap.take_slot(other_c.pk)  # the free slot
    with pytest.raises(cluster_cap.SlotWait):
        cluster_cap.take_slot(other_d.pk)
    cluster_cap.release_slot(other_c.node)  # wakes the line: the paused ones wait on, d goes
    assert holders(nodes) == [other_d.node.hostname]
    assert {step(run, "slot").state for run in (paused_a, paused_b)} == {"running"}


def test_a_scheduled_run_of_a_paused_rollout_begins_its_update_phase_only_once_resumed(
    releases, settings, staff, django_capture_on_commit_callbacks
):
    settings.TGP_REPO_URL = NOBODY
    nodes = cluster_of(2, cap=2)
    schedule = schedule_of(nodes[0].cluster)
    scheduled.fire(schedule.pk, "download")
    rollout = Rollout.objects.get()
    rollouts.pause(rollout.pk, staff("op", "update"))
    PlanEntry.objects.filter(plan__schedule=schedule).update(planned_at=timezone.now() - timedelta(minutes=1))
    runs = list(UpdateRun.objects.filter(rollout=rollout).select_related("node__cluster", "release"))
    with django_capture_on_commit_callbacks(execute=False) as queued:
        assert not chains.start_update_phase(runs[0].pk, arm=True), "its time has come, but it waits"
        assert chains.start_update_phases(runs, arm=True) == []
    assert not queued, "no timer either: the resume carries it on"
    # Waiting for a resume is not silence: neither the reaper nor the reconciler touches it.
    UpdateRun.objects.filter(rollout=rollout).update(last_activity_at=timezone.now() - timedelta(days=1))
    UpdateRun.objects.filter(rollout=rollout).update(scheduled_for=timezone.now() - timedelta(days=1))
    assert recovery.reap_stale_runs() == 0
    rollouts.resume(rollout.pk, "op")
    with django_capture_on_commit_callbacks(execute=False) as queued:
        assert rollouts.wake(rollout.pk) == 2
    (started,) = [c for c in queued if isinstance(c, QueueStarted)]
    assert sorted(chain.run_id for chain in started.chains) == sorted(run.pk for run in runs)
    assert all(run.update_phase_started for run in UpdateRun.objects.filter(rollout=rollout))


# --- cancel --------------------------------------------------------------------------------------


def test_cancel_calls_off_the_nodes_not_yet_started_and_started_ones_go_on(
    releases, staff, django_capture_on_commit_callbacks
):
    nodes = cluster_of(3, cap=1)
    started, waiting, queued_only = start(nodes)
    cluster_cap.take_slot(started.pk)
    with pytest.raises(cluster_cap.SlotWait):
        cluster_cap.take_slot(waiting.pk)  # in line
    with django_capture_on_commit_callbacks(execute=False):
        assert rollouts.cancel(started.rollout_id, staff("op", "update")) == 2
        assert rollouts.cancel_unstarted(started.rollout_id, "again") == 0, "safe to run twice"
    states = dict(UpdateRun.objects.filter(rollout_id=started.rollout_id).values_list("pk", "state"))
    assert states == {started.pk: "running", waiting.pk: "cancelled", queued_only.pk: "cancelled"}
    for run in (waiting, queued_only):
        run.refresh_from_db()
        assert run.error == "its rollout was cancelled by op"
        assert not run.steps.exclude(state="skipped").exists()
        assert not Node.objects.get(pk=run.node_id).maintenance_mode, "maintenance mode ends, as for a plan's"
        assert not UpdateLock.objects.filter(node_id=run.node_id).exists()
    assert Rollout.objects.get().shown_state == "cancelled"


def test_a_node_of_a_cancelled_rollout_that_reaches_its_gate_is_called_off_there(releases):
    # A run the cancel did not see (it took a slot's hand-off meanwhile, say) is called off at its gate.
    nodes = cluster_of(2, cap=2)
    first, _ = start(nodes)
    Rollout.objects.filter(pk=first.rollout_id).update(state="cancelled")
    cluster_cap.take_slot(first.pk)
    first.refresh_from_db()
    assert first.state == "cancelled" and holders(nodes) == []


def test_a_run_cancelled_while_it_takes_a_slot_gives_the_slot_to_the_next_waiter(releases, monkeypatch):
    nodes = cluster_of(3, cap=1)
    holder, waiter, racing = start(nodes)
    cluster_cap.take_slot(holder.pk)
    with pytest.raises(cluster_cap.SlotWait):
        cluster_cap.take_slot(waiter.pk)
    cluster_cap.cluster_slots().release(nodes[0].cluster.name, holder.node.hostname)  # free, nobody woken yet
    real = cluster_cap._semaphore

    def cancelled_meanwhile(step_name, cluster):
        semaphore, bound, what = real(step_name, cluster)

        class Racing:
            def acquire(self, *args):
                token = semaphore.acquire(*args)
                end.cancel_unstarted_run(racing.pk, "its rollout was cancelled")  # between the slot and its claim
                return token

            def __getattr__(self, name):
                return getattr(semaphore, name)

        return Racing(), bound, what

    monkeypatch.setattr(cluster_cap, "_semaphore", cancelled_meanwhile)
    cluster_cap.take_slot(racing.pk)
    monkeypatch.setattr(cluster_cap, "_semaphore", real)
    racing.refresh_from_db()
    assert racing.state == "cancelled" and step(racing, "slot").state == "skipped"
    assert holders(nodes) == [waiter.node.hostname], "the slot went on to the waiter, not kept by a cancelled run"


# --- the error threshold -----------------------------------------------------------------------


def test_the_first_failure_pauses_a_rollout_unless_its_threshold_says_otherwise(releases):
    cluster_runs = start(cluster_of(4))
    end.fail_run(cluster_runs[0].pk, "install: boom")
    rollout = Rollout.objects.get(pk=cluster_runs[0].rollout_id)
    assert rollout.state == "paused"
    assert rollout.state_reason == "paused by itself after 1 failed node: 1 of its 4 nodes failed"
    single_runs = start(singles(2))  # single systems: the same default
    end.fail_run(single_runs[0].pk, "boom")
    assert Rollout.objects.get(pk=single_runs[0].rollout_id).state == "paused"

    half = start(cluster_of(4))
    Rollout.objects.filter(pk=half[0].rollout_id).update(failure_threshold=50, failure_threshold_unit="percent")
    end.fail_run(half[0].pk, "boom")
    assert Rollout.objects.get(pk=half[0].rollout_id).state == "running", "1 of 4 is not half"
    end.fail_run(half[1].pk, "boom")
    assert Rollout.objects.get(pk=half[0].rollout_id).state == "paused"


# --- the page ------------------------------------------------------------------------------------


def action(name: str, rollout: Rollout) -> str:
    return reverse(f"admin:updates_rollout_{name}", args=[rollout.pk])


def test_only_group_update_acts_on_a_rollout_by_post_with_csrf(client, staff, releases):
    start(cluster_of(2))
    rollout = Rollout.objects.get()
    for who in (staff("viewer"), staff("mt", "maint")):
        client.force_login(who)
        assert client.get(reverse("admin:updates_rollout_change", args=[rollout.pk])).status_code == 200
        for name in ("pause", "resume", "cancel"):
            assert client.post(action(name, rollout)).status_code == 403
    op = staff("op", "update")
    client.force_login(op)
    assert client.get(action("pause", rollout)).status_code == 405
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(op)
    assert strict.post(action("pause", rollout)).status_code == 403, "no CSRF token"
    assert Rollout.objects.get().state == "running"
    assert client.post(action("pause", rollout)).status_code == 302
    assert Rollout.objects.get().state == "paused"
    page = client.get(reverse("admin:updates_rollout_change", args=[rollout.pk]))
    assert "Resume</button>" in page.text and "Pause</button>" not in page.text


def test_lowering_the_threshold_on_the_page_saves_only_it_and_pauses_at_once(operator, releases):
    runs = start(cluster_of(4))
    rollout = runs[0].rollout
    Rollout.objects.filter(pk=rollout.pk).update(failure_threshold=3)
    end.fail_run(runs[0].pk, "boom")
    page = reverse("admin:updates_rollout_change", args=[rollout.pk])
    form = {"failure_threshold": "1", "failure_threshold_unit": "count"}
    assert operator.post(page, form).status_code == 302
    rollout.refresh_from_db()
    assert (rollout.failure_threshold, rollout.state) == (1, "paused")


def page_queries(client, rollout: Rollout) -> int:
    with CaptureQueriesContext(connection) as queries:
        page = client.get(reverse("admin:updates_rollout_change", args=[rollout.pk]))
    assert page.status_code == 200
    assert page.text.count('<tr data-node="') == rollout.runs.count()
    assert page.text.count('class="plan-timeline"') == 1
    return len(queries)


def test_the_rollout_page_costs_the_same_queries_for_thirty_nodes_as_for_three(operator, settings):
    rollout_of = {}
    for size in (3, 30):
        start(cluster_of(size))
        rollout_of[size] = Rollout.objects.order_by("-pk").first()
    page_queries(operator, rollout_of[3])  # warm: the session, content types
    assert page_queries(operator, rollout_of[30]) == page_queries(operator, rollout_of[3])
    assert "at most 1, actual peak 0" in operator.get(rollout_of[3].get_absolute_url()).text, "no plan: what happened"
    # An occurrence's rollout shows its plan, as the schedule's page does.
    settings.TGP_REPO_URL = NOBODY
    nodes = cluster_of(3)
    schedule = schedule_of(nodes[0].cluster)
    scheduled.fire(schedule.pk, "download")
    page = operator.get(reverse("admin:updates_rollout_change", args=[Rollout.objects.get(schedule=schedule).pk]))
    assert page.text.count('class="planned-off"') == 3
    assert operator.get(reverse("admin:updates_rollout_changelist")).status_code == 200
    run = rollout_of[3].runs.first()
    assert rollout_of[3].get_absolute_url() in operator.get(run.get_absolute_url()).text, "a run links its rollout"


# --- with real agents ------------------------------------------------------------------------------


def break_install(state_dir, run: UpdateRun) -> None:
    """The simulated appliance cannot stage this run's release: its install fails."""
    staging = state_dir / run.node.hostname / "releases" / f"{run.pk}-{run.release.version}.staging"
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.write_text("in the way")


def in_service(state_dir, run: UpdateRun) -> bool:
    state = json.loads((state_dir / run.node.hostname / "state.json").read_text())
    return state["in_load_balancer"] and state["logon_enabled"] and bool(state["sessions"])


@pytest.mark.django_db(transaction=True)
@pytest.mark.workflow
@pytest.mark.timeout(180)
def test_a_cluster_whose_first_node_fails_pauses_by_itself_and_no_other_node_starts(
    demo_repo, make_node, agent_for, state_dir
):
    repo, _ = demo_repo
    repo.import_releases()
    cluster = Cluster.objects.create(name=f"ro-{uuid.uuid4().hex[:6]}", max_parallel_updates=1)
    nodes = [make_node("r", cluster=cluster) for _ in range(3)]
    for made in nodes:
        agent_for(made, TGP_SIM_STEP_SECONDS="0.1-0.2")
    runs = start(list(Node.objects.filter(cluster=cluster).select_related("cluster")))
    for run in runs:
        break_install(state_dir, run)  # whichever goes first fails
    rollout = Rollout.objects.get(pk=runs[0].rollout_id)

    ended = wait_for(lambda: UpdateRun.objects.filter(rollout=rollout, state="failed").first(), 90, "a failure")
    wait_for(lambda: Rollout.objects.get(pk=rollout.pk).state == "paused", 10, "the rollout to pause")
    assert "paused by itself" in Rollout.objects.get(pk=rollout.pk).state_reason
    others = [run for run in runs if run.pk != ended.pk]
    # The failed node keeps its slot until maintenance mode ends; then the slot is free, and still nobody starts.
    assert services.end_maintenance(Node.objects.get(pk=ended.node_id))
    wait_for(lambda: not holders(nodes), 10, "the failed node's slot to be released")
    wait_for(lambda: all(step(run, "slot").state == "running" for run in others), 30, "the others in line")
    wait_for(lambda: Rollout.objects.get(pk=rollout.pk).progress.waiting == 2, 10, "two waiting")
    assert not holders(nodes), "a paused rollout's nodes take no free slot"
    assert all(step(run, "drain").state == "pending" and in_service(state_dir, run) for run in others)

    # Resumed, the next node takes the slot at once (the control worker's wake), fails the same way,
    # and the rollout pauses again: the third node never starts.
    rollouts.resume(rollout.pk, "op")
    wait_for(lambda: UpdateRun.objects.filter(rollout=rollout, state="failed").count() == 2, 60, "the second node")
    wait_for(lambda: Rollout.objects.get(pk=rollout.pk).state == "paused", 10, "the rollout to pause again")
    (third,) = UpdateRun.objects.filter(rollout=rollout, state="running")
    assert step(third, "drain").state == "pending" and in_service(state_dir, third)


def test_a_percentage_threshold_above_100_is_a_form_error_and_changes_nothing(operator, releases):
    rollout = start(cluster_of(2))[0].rollout
    page = reverse("admin:updates_rollout_change", args=[rollout.pk])
    response = operator.post(page, {"failure_threshold": "150", "failure_threshold_unit": "percent"})
    assert response.status_code == 200
    assert "A percentage of its nodes: at most 100." in response.text
    rollout.refresh_from_db()
    assert (rollout.failure_threshold, rollout.failure_threshold_unit) == (1, "count")
