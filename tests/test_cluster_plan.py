"""The rolling plan of a cluster schedule: each node's own update time within the
cluster's two bounds, what an operator may change, and how an overrun moves the
nodes after it (tests/test_cluster_plan_workflow.py runs one with real agents)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from nodes.models import Cluster
from updates import plans
from updates.models import LeftSchedule, PlanEntry, UpdateLock, UpdateRun, UpdateSchedule
from updates.placement import Bounds, Slot, Todo, peak, place

T = datetime(2026, 12, 6, 3, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)


def todo(n: int, minutes: int = 13) -> list[Todo]:
    return [Todo(f"n{i}", minutes * MIN, T) for i in range(n)]


def test_a_cap_1_cluster_rolls_node_after_node_each_out_only_its_lead_before_its_own_time():
    # The cluster: 3 nodes, cap 1, 13-minute updates, a lead of 1 hour.
    slots = place(Bounds(T, 60 * MIN, cap=1, out_bound=3), todo(3))
    assert [s.at - T for s in slots] == [0 * MIN, 13 * MIN, 26 * MIN], "each as soon as the one before is back"
    assert [s.at - s.out_from for s in slots] == [60 * MIN] * 3, "out of the load balancer exactly the lead before"


def test_the_first_wave_goes_at_the_occurrence_and_never_more_than_the_cap_update_at_once():
    slots = place(Bounds(T, 10 * MIN, cap=2, out_bound=4), todo(6, minutes=8))
    # The third wave could update at +16, but would leave at +6 while 4 nodes are out: it
    # leaves as the first wave is back (+8), and so updates a lead later (+18).
    assert sorted(s.at - T for s in slots) == [0 * MIN, 0 * MIN, 8 * MIN, 8 * MIN, 18 * MIN, 18 * MIN]
    for s in slots:
        assert peak(((p.at, p.back) for p in slots), s.at, s.back) <= 2
        assert peak(((p.out_from, p.back) for p in slots), s.out_from, s.back) <= 4


def test_the_bound_on_nodes_out_of_the_load_balancer_delays_later_waves():
    # With a lead far longer than an update, the third wave would leave while the first is out:
    # a bound of 2 (= the cap) lets a node leave only once another is back.
    slots = place(Bounds(T, 60 * MIN, cap=1, out_bound=1), todo(2))
    assert slots[1].out_from == slots[0].back, "the second leaves as the first is back"
    assert slots[1].at == slots[0].back + 60 * MIN


def test_bounds_that_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="cannot be kept"):
        place(Bounds(T, MIN, cap=2, out_bound=1), todo(2))


def test_a_node_is_never_placed_before_a_time_its_users_were_told():
    fixed = [Slot("n0", T, T + 20 * MIN, T - 10 * MIN)]
    later = Todo("n1", 10 * MIN, T + 30 * MIN)
    assert place(Bounds(T, 10 * MIN, cap=1, out_bound=2), [later], fixed)[-1].at == T + 30 * MIN


def test_an_overrunning_node_is_expected_back_in_steps_not_at_every_look():
    off, expected = T, 10 * MIN
    assert plans.expected_back(off, expected, T + 5 * MIN) == T + 10 * MIN
    assert plans.expected_back(off, expected, T + 11 * MIN) == T + 15 * MIN
    assert plans.expected_back(off, expected, T + 14 * MIN) == T + 15 * MIN, "the same step: nobody moves again"
    assert plans.expected_back(off, expected, T + 15 * MIN) == T + 20 * MIN


# --- with the database -------------------------------------------------------------------


@pytest.fixture
def cluster(db):
    return Cluster.objects.create(
        name=f"plan-{uuid.uuid4().hex[:8]}", max_parallel_updates=2, lb_lead_time=timedelta(minutes=10),
        expected_update=timedelta(minutes=8),
    )  # fmt: skip


@pytest.fixture
def schedule(cluster, make_node, releases):
    for _ in range(4):
        make_node("p", cluster=cluster)
    occurrence = timezone.now() + timedelta(days=1)
    return UpdateSchedule.objects.create(name="plan", cluster=cluster, run_at=occurrence)


def test_a_plan_is_made_once_per_occurrence_with_the_clusters_bounds(schedule, cluster):
    plan = plans.ensure_plan(schedule, schedule.run_at)
    assert plans.ensure_plan(schedule, schedule.run_at) == plan, "made once"
    assert (plan.cap, plan.out_bound, plan.lead) == (2, 4, timedelta(minutes=10))
    times = sorted(e.planned_at - schedule.run_at for e in plan.entries.all())
    assert times == [timedelta(0), timedelta(0), timedelta(minutes=8), timedelta(minutes=8)]


def test_a_preview_before_the_plan_is_made_stores_nothing(schedule):
    preview = plans.preview(schedule, schedule.run_at)
    assert not preview.stored and len(preview.entries) == 4
    assert not PlanEntry.objects.exists()


def test_nodes_locked_up_to_date_or_left_out_get_no_place_and_say_why(schedule, cluster):
    first, second, third, _ = cluster.nodes.order_by("hostname")
    UpdateLock.objects.create(node=first, reason="failed")
    second.installed_version = "2.2.0"
    second.save()
    LeftSchedule.objects.create(schedule=schedule, node=third, reason="download failed twice")
    preview = plans.preview(schedule, schedule.run_at)
    assert len(preview.entries) == 1
    assert preview.left_out == {
        first.hostname: "update lock: failed",
        second.hostname: "up to date",
        third.hostname: "left the schedule: download failed twice",
    }


def test_expected_durations_come_from_the_last_successful_updates(schedule, cluster, releases):
    node = cluster.nodes.first()
    for minutes in (5, 7, 30, 9):  # the oldest (5) is not among the last three
        run = UpdateRun.objects.create(node=node, release=releases["2.2.0"], state="succeeded",
                                       finished_at=timezone.now())  # fmt: skip
        off = timezone.now() - timedelta(hours=1)
        run.steps.create(name="drain", position=0, state="succeeded", started_at=off)
        run.steps.create(name="resume", position=1, state="succeeded", finished_at=off + timedelta(minutes=minutes))
    found = plans.expected_durations(list(cluster.nodes.all()), cluster.expected_update)
    assert found[node.pk] == timedelta(minutes=9), "the median of 7, 30 and 9"
    assert set(found.values()) == {timedelta(minutes=9), timedelta(minutes=8)}, "the others: the cluster's setting"


def test_an_operator_moves_a_node_within_the_bounds_and_is_refused_beyond_them(schedule, staff):
    plan = plans.ensure_plan(schedule, schedule.run_at)
    op = staff("op", "update")
    late = plan.entries.order_by("-planned_at", "node__hostname").first()
    plans.move(late, schedule.run_at + timedelta(minutes=30), op)
    assert PlanEntry.objects.get(pk=late.pk).planned_at == schedule.run_at + timedelta(minutes=30)
    with pytest.raises(plans.PlanRefused, match="3 nodes would be updating at once"):
        plans.move(PlanEntry.objects.get(pk=late.pk), schedule.run_at, op)
    with pytest.raises(plans.PlanRefused, match="before the occurrence"):
        plans.move(PlanEntry.objects.get(pk=late.pk), schedule.run_at - timedelta(minutes=1), op)
    assert PlanEntry.objects.get(pk=late.pk).planned_at == schedule.run_at + timedelta(minutes=30), "unchanged"


def test_a_node_whose_update_has_begun_can_no_longer_be_moved_or_left_out(schedule, staff):
    plan = plans.ensure_plan(schedule, schedule.run_at)
    entry = plan.entries.first()
    during = entry.out_at + timedelta(seconds=1)
    with pytest.raises(plans.PlanRefused, match="has begun"):
        plans.move(entry, entry.planned_at + timedelta(hours=1), staff("op", "update"), now=during)
    with pytest.raises(plans.PlanRefused, match="has begun"):
        plans.set_excluded(entry, True, staff("op2", "update"), now=during)


def test_leaving_a_node_out_calls_its_downloaded_run_off_without_a_lock(schedule, staff, releases):
    plan = plans.ensure_plan(schedule, schedule.run_at)
    entry = plan.entries.select_related("node").first()
    run = UpdateRun.objects.create(node=entry.node, release=releases["2.2.0"], trigger="scheduled",
                                   schedule=schedule, scheduled_for=schedule.run_at)  # fmt: skip
    run.steps.create(name="download", position=0, state="succeeded")
    run.steps.create(name="leave", position=1)
    type(entry.node).objects.filter(pk=entry.node_id).update(maintenance_mode=True)
    plans.set_excluded(entry, True, staff("op", "update"))
    run.refresh_from_db()
    assert run.state == "cancelled" and "left out" in run.error
    assert set(run.steps.values_list("state", flat=True)) == {"succeeded", "skipped"}
    entry.node.refresh_from_db()
    assert not entry.node.maintenance_mode and not UpdateLock.objects.filter(node=entry.node).exists()


def test_the_cluster_refuses_a_bound_out_of_the_load_balancer_below_its_cap(cluster):
    cluster.max_out_of_lb = 1
    with pytest.raises(ValidationError, match="At least as many as may update at once"):
        cluster.full_clean()
    cluster.max_out_of_lb = None
    assert cluster.out_of_lb_bound == 4, "the default: twice the cap"


def test_a_node_that_may_update_later_joins_the_plan_after_the_others(schedule, cluster):
    first = cluster.nodes.order_by("hostname").first()
    lock = UpdateLock.objects.create(node=first, reason="failed")
    plan = plans.ensure_plan(schedule, schedule.run_at)
    assert not plan.entries.filter(node=first).exists()
    lock.removed_at = timezone.now()
    lock.save()
    plans.ensure_plan(schedule, schedule.run_at)  # the next firing
    joined = plan.entries.get(node=first)
    others = plan.entries.exclude(node=first)
    assert joined.planned_at >= max(e.planned_at for e in others) and joined.note == "joined the plan late"


def _in_progress(entry, releases, off):
    run = UpdateRun.objects.create(node=entry.node, release=releases["2.2.0"], trigger="scheduled",
                                   schedule=entry.plan.schedule, scheduled_for=entry.plan.occurrence,
                                   update_phase_started=True)  # fmt: skip
    run.steps.create(name="exclude", position=0, state="succeeded", started_at=entry.out_at)
    run.steps.create(name="drain", position=1, state="succeeded", started_at=off)
    return run


def test_a_node_logged_off_a_moment_late_moves_nobody_an_overrun_moves_the_next_and_tells_its_users(
    cluster, make_node, releases, django_capture_on_commit_callbacks
):
    Cluster.objects.filter(pk=cluster.pk).update(max_parallel_updates=1)
    cluster.refresh_from_db()
    for _ in range(2):
        make_node("p", cluster=cluster)
    occurrence = timezone.now() + timedelta(hours=1)
    schedule = UpdateSchedule.objects.create(name="plan", cluster=cluster, run_at=occurrence)
    plan = plans.ensure_plan(schedule, occurrence)
    first, second = plan.entries.select_related("node", "plan").order_by("planned_at")
    _in_progress(first, releases, off=first.planned_at + timedelta(seconds=2))

    with django_capture_on_commit_callbacks(execute=False) as told:
        assert plans.replan(plan, now=first.planned_at + timedelta(seconds=3)) == []
    assert not told, "2 s late is on time: nobody moves, nobody is told"

    overrun = first.back_at + timedelta(seconds=1)
    with django_capture_on_commit_callbacks(execute=False) as told:
        (moved,) = plans.replan(plan, now=overrun)
    assert moved.node == second.node and moved.planned_at == first.back_at + first.expected / 2
    (notice,) = told
    command = notice.__self__.args[0]["body"]["command"]
    assert command["node"] == second.node.hostname and command["at"] == moved.planned_at.timestamp()
    assert "delayed" in command["message"]


def test_a_replan_places_the_nodes_out_already_before_those_still_in_line():
    # Lead 0, the bound out of the load balancer equal to the cap: one node still in line
    # placed before the ones out already left them no instant at all ("fits nowhere").
    bounds = Bounds(T, timedelta(0), cap=2, out_bound=2)
    out_since = T - MIN
    fixed = [Slot("busy", T, T + 10 * MIN, T)]
    in_line = Todo("waiting", 2 * MIN, T)
    out = Todo("out", 2 * MIN, T, out_since=out_since)
    with pytest.raises(ValueError, match="fits nowhere"):
        place(bounds, [in_line, out], fixed)
    slots = {s.node: s for s in place(bounds, [out, in_line], fixed)}
    assert slots["out"].at == T and slots["waiting"].at == T + 2 * MIN


def _plan_of_three(cluster, make_node, occurrence):
    Cluster.objects.filter(pk=cluster.pk).update(max_parallel_updates=1)
    cluster.refresh_from_db()
    for _ in range(3):
        make_node("p", cluster=cluster)
    schedule = UpdateSchedule.objects.create(name="plan", cluster=cluster, run_at=occurrence)
    plan = plans.ensure_plan(schedule, occurrence)
    return list(plan.entries.select_related("node", "plan").order_by("planned_at"))


def test_a_holding_node_looks_at_its_plan_only_once_a_node_before_it_may_be_updating(
    cluster, make_node, releases, settings
):
    look = timedelta(seconds=settings.TGP_PLAN_LOOK)
    first, second, third = _plan_of_three(cluster, make_node, timezone.now() + timedelta(hours=1))
    before = first.planned_at - timedelta(minutes=30)
    assert plans.next_look(second, before) == first.planned_at + look, "nobody is updating: nothing can move"
    assert plans.next_look(third, before) == first.planned_at + look
    assert plans.next_look(second, first.planned_at + timedelta(seconds=5)) is None, "its time passed: look now"

    # Logged off a moment before its time (the node's clock): updating, so it may overrun.
    run = _in_progress(first, releases, off=first.planned_at - timedelta(seconds=0.2))
    assert plans.next_look(second, first.planned_at - timedelta(seconds=0.1)) is None, "updating: it may overrun"
    back = first.back_at - timedelta(minutes=1)
    UpdateRun.objects.filter(pk=run.pk).update(finished_at=back)
    assert plans.next_look(third, back) == second.planned_at + look, "back early: only the second may move it"
    done = _in_progress(second, releases, off=second.planned_at)
    UpdateRun.objects.filter(pk=done.pk).update(finished_at=second.planned_at + timedelta(minutes=1))
    assert plans.next_look(third, second.planned_at + timedelta(minutes=1)) == third.planned_at, "nobody left"


def test_a_hold_before_anyone_of_its_plan_updates_waits_for_them_not_every_look(cluster, make_node, releases, settings):
    from updates.runs import cluster_cap
    from updates.runs.chains import LONGEST_NAP

    first, second, _ = _plan_of_three(cluster, make_node, timezone.now() + timedelta(minutes=3))
    run = UpdateRun.objects.create(node=second.node, release=releases["2.2.0"], trigger="scheduled",
                                   schedule=second.plan.schedule, scheduled_for=second.plan.occurrence,
                                   update_phase_started=True)  # fmt: skip
    run.steps.create(name="hold", position=0)
    until = (first.planned_at - timezone.now()).total_seconds() + settings.TGP_PLAN_LOOK
    with pytest.raises(cluster_cap.HoldOn) as held:
        cluster_cap.hold(run.pk)
    assert until - 5 < held.value.seconds <= until, "one look after the first node's time, not one every 30 s"

    # Hours ahead: no countdown longer than a timer's longest nap (the broker's visibility timeout).
    PlanEntry.objects.filter(plan=first.plan).update(planned_at=timezone.now() + timedelta(hours=3))
    with pytest.raises(cluster_cap.HoldOn) as held:
        cluster_cap.hold(run.pk)
    assert held.value.seconds == LONGEST_NAP
