"""A scheduled cluster node's drain goes ahead of its users' time: within
TGP_DRAIN_AHEAD of its planned time its hold takes a free update slot and queues the
drain, and the node logs its users off at that time by its own clock. So a control
queue that is busy at the update time (a fleet-wide update, bench/fleet_update.py)
no longer makes the first waves late. It never passes a node due before it, nor one
in line; a replan no longer moves it, and the reconciler does not take its wait for
a lost message."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.core.checks import run_checks
from django.utils import timezone

from agent import steps as node_steps
from agent.shared.protocol import LONGEST_LOGOFF_WAIT, StepCommand
from nodes.models import Cluster, Node
from tests.test_cluster_plan_workflow import make_cluster, moments, on_time, run_schedule, schedule_in
from updates import plans
from updates.models import PlanEntry, UpdateRun, UpdateSchedule, UpdateStep
from updates.runs import chains, cluster_cap, recovery, start
from updates.runs.chains import QueueChain


@pytest.fixture
def cluster(db):
    # A name of its own: the slots live in the session's Redis.
    cluster = Cluster.objects.create(
        name=f"ahead-{uuid.uuid4().hex[:8]}", max_parallel_updates=2, lb_lead_time=timedelta(minutes=10),
        expected_update=timedelta(minutes=8),
    )  # fmt: skip
    yield cluster
    for holder in cluster_cap.cluster_slots().holders(cluster.name):
        cluster_cap.cluster_slots().release(cluster.name, holder.node)


def plan_in(cluster, make_node, seconds: float, nodes: int = 3) -> list[PlanEntry]:
    """A plan whose first wave (two nodes, the cap) is due `seconds` from now, the third 8 minutes later."""
    for _ in range(nodes):
        make_node("p", cluster=cluster)
    occurrence = timezone.now() + timedelta(seconds=seconds)
    schedule = UpdateSchedule.objects.create(name="plan", cluster=cluster, run_at=occurrence)
    plan = plans.ensure_plan(schedule, occurrence)
    return list(plan.entries.select_related("node", "plan").order_by("planned_at", "node__hostname"))


def holding(entry: PlanEntry, releases) -> UpdateRun:
    """The entry's run out of the load balancer, its hold next: as the chain leaves it."""
    run = UpdateRun.objects.create(node=entry.node, release=releases["2.2.0"], trigger="scheduled",
                                   schedule=entry.plan.schedule, scheduled_for=entry.plan.occurrence,
                                   update_phase_started=True)  # fmt: skip
    names = start.plan_steps(entry.node, UpdateRun.Trigger.SCHEDULED)
    for position, name in enumerate(names):
        done = position < names.index("hold")
        run.steps.create(name=name, position=position, state="succeeded" if done else "pending")
    return run


def state(run: UpdateRun, name: str) -> str:
    return UpdateStep.objects.get(run=run, name=name).state


def test_within_the_lead_a_free_slot_is_taken_and_the_drain_carries_its_users_time(
    cluster, make_node, releases, django_capture_on_commit_callbacks
):
    first, _, _ = plan_in(cluster, make_node, 30)
    run = holding(first, releases)

    with django_capture_on_commit_callbacks(execute=False) as queued:
        cluster_cap.hold(run.pk)  # no HoldOn: nothing more to wait for on this side

    assert (state(run, "hold"), state(run, "slot")) == ("succeeded", "succeeded")
    assert [h.node for h in cluster_cap.cluster_slots().holders(cluster.name)] == [first.node.hostname]
    assert queued == [QueueChain(run.pk, "drain")], "the drain is queued now, half a minute before the time"
    run.refresh_from_db()
    drain = chains.build_chain(run, "drain").tasks[0]
    assert drain.task == "node.drain" and drain.options["queue"] == first.node.queue
    command = drain.args[0]["body"]["command"]
    assert command["at"] == first.planned_at.timestamp(), "the node logs its users off at their time"
    assert command["fence"] == run.slot_token


def test_a_hold_that_takes_its_slot_ahead_reads_its_run_and_plan_entry_once(
    cluster, make_node, releases, django_capture_on_commit_callbacks, django_assert_max_num_queries
):
    # A fleet-wide update's first waves: some 1,000 of these in the minute before the
    # update time (bench/fleet_update.py). 10 statements (and a savepoint's two: a test
    # runs in a transaction); the chain is built from the run and entry at hand.
    first, _, _ = plan_in(cluster, make_node, 30)
    run = holding(first, releases)
    with django_assert_max_num_queries(12), django_capture_on_commit_callbacks(execute=True):
        cluster_cap.hold(run.pk)
    assert state(run, "slot") == "succeeded"


def test_before_the_lead_a_hold_sleeps_until_the_lead_begins(cluster, make_node, releases, settings):
    first, _, _ = plan_in(cluster, make_node, 180)
    run = holding(first, releases)
    until = (first.planned_at - timezone.now()).total_seconds() - settings.TGP_DRAIN_AHEAD
    with pytest.raises(cluster_cap.HoldOn) as held:
        cluster_cap.hold(run.pk)
    assert until - 5 < held.value.seconds <= until
    assert state(run, "slot") == "pending" and not cluster_cap.cluster_slots().holders(cluster.name)


def test_with_no_free_slot_ahead_nothing_changes_and_it_holds_until_its_time(
    cluster, make_node, releases, django_capture_on_commit_callbacks
):
    first, _, _ = plan_in(cluster, make_node, 30)
    run = holding(first, releases)
    for other in ("elsewhere-1", "elsewhere-2"):  # both slots taken (an operator's Auto-Updates, say)
        assert cluster_cap.cluster_slots().acquire(cluster.name, other, 2) is not None

    with pytest.raises(cluster_cap.HoldOn) as held, django_capture_on_commit_callbacks(execute=False) as queued:
        cluster_cap.hold(run.pk)

    assert not queued
    assert 25 < held.value.seconds <= (first.planned_at - timezone.now()).total_seconds() + 0.1
    assert state(run, "slot") == "pending", "not in line: at its time it asks as before (and waits in line then)"
    assert not UpdateStep.objects.in_line().filter(run=run).exists()
    assert PlanEntry.objects.get(pk=first.pk).planned_at == first.planned_at, "no replan before its time"


def test_no_lead_takes_the_slot_only_at_the_planned_time(
    cluster, make_node, releases, settings, django_capture_on_commit_callbacks
):
    settings.TGP_DRAIN_AHEAD = 0
    first, _, _ = plan_in(cluster, make_node, 30)
    run = holding(first, releases)
    with pytest.raises(cluster_cap.HoldOn) as held, django_capture_on_commit_callbacks(execute=False) as queued:
        cluster_cap.hold(run.pk)
    assert not queued and state(run, "slot") == "pending"
    assert held.value.seconds > 25, "it sleeps until its time"


def test_it_never_takes_a_slot_that_a_node_due_before_it_is_still_holding_out_for(
    cluster, make_node, releases, settings, django_capture_on_commit_callbacks
):
    settings.TGP_DRAIN_AHEAD = LONGEST_LOGOFF_WAIT  # the third node's lead is open too
    first, second, third = plan_in(cluster, make_node, 20)
    runs = [holding(entry, releases) for entry in (first, second, third)]
    assert third.planned_at - timezone.now() < timedelta(seconds=LONGEST_LOGOFF_WAIT)

    with pytest.raises(cluster_cap.HoldOn), django_capture_on_commit_callbacks(execute=False) as queued:
        cluster_cap.hold(runs[2].pk)
    assert not queued and state(runs[2], "slot") == "pending", "the first wave has not taken its slots yet"

    with django_capture_on_commit_callbacks(execute=False):
        cluster_cap.hold(runs[0].pk)
        cluster_cap.hold(runs[1].pk)
    cluster_cap.cluster_slots().release(cluster.name, second.node.hostname)  # back early
    UpdateRun.objects.filter(pk=runs[1].pk).update(state="succeeded", finished_at=timezone.now())

    with django_capture_on_commit_callbacks(execute=False) as queued:
        cluster_cap.hold(runs[2].pk)
    assert queued == [QueueChain(runs[2].pk, "drain")], "everyone before it holds a slot or is back: its turn"


def test_it_never_takes_a_slot_from_a_node_waiting_in_line(
    cluster, make_node, releases, django_capture_on_commit_callbacks
):
    first, _, _ = plan_in(cluster, make_node, 30)
    run = holding(first, releases)
    for other in ("elsewhere-1", "elsewhere-2"):
        cluster_cap.cluster_slots().acquire(cluster.name, other, 2)
    with django_capture_on_commit_callbacks(execute=False):
        waiter = start.start_update(make_node("p", cluster=cluster), releases["2.2.0"])  # an operator's Auto-Update
        with pytest.raises(cluster_cap.SlotWait):
            cluster_cap.take_slot(waiter.pk)
    cluster_cap.cluster_slots().release(cluster.name, "elsewhere-1")  # its release is yet to wake the line

    with pytest.raises(cluster_cap.HoldOn), django_capture_on_commit_callbacks(execute=False) as queued:
        cluster_cap.hold(run.pk)
    assert not queued and state(run, "slot") == "pending"


def test_a_replan_does_not_move_a_node_that_holds_its_slot_ahead(
    cluster, make_node, releases, django_capture_on_commit_callbacks
):
    Cluster.objects.filter(pk=cluster.pk).update(max_parallel_updates=1)
    cluster.refresh_from_db()
    entries = plan_in(cluster, make_node, 600, nodes=2)
    before, after = entries
    overrunning = holding(before, releases)
    UpdateStep.objects.filter(run=overrunning, name="drain").update(state="succeeded", started_at=before.planned_at)
    # The next one took its slot ahead of its time (the cap was 2 then: an operator lowered it).
    ahead = holding(after, releases)
    UpdateStep.objects.filter(run=ahead, name__in=("hold", "slot")).update(
        state="succeeded", finished_at=after.planned_at - timedelta(seconds=30)
    )

    with django_capture_on_commit_callbacks(execute=False) as told:
        moved = plans.replan(before.plan, now=before.back_at + timedelta(seconds=1))
    assert moved == [] and not told, "its drain is on the node with its time: its users keep the time they were told"


def test_the_reconciler_leaves_a_drain_waiting_for_its_users_time_alone_and_carries_a_lost_one_on(
    cluster, make_node, releases, settings, django_capture_on_commit_callbacks
):
    first, _, _ = plan_in(cluster, make_node, 30)
    run = holding(first, releases)
    with django_capture_on_commit_callbacks(execute=False):
        cluster_cap.hold(run.pk)
    quiet = timezone.now() - timedelta(seconds=2 * settings.TGP_RECONCILE_AFTER)
    UpdateRun.objects.filter(pk=run.pk).update(last_activity_at=quiet)
    Node.objects.filter(pk=first.node_id).update(last_seen=timezone.now())  # its agent is alive

    with django_capture_on_commit_callbacks(execute=False) as queued:
        recovery.reconcile()
    assert QueueChain(run.pk, "drain") not in queued, "the drain waits on the node until its users' time"

    gone = timezone.now() - timedelta(seconds=settings.TGP_RECONCILE_AFTER + 1)
    PlanEntry.objects.filter(pk=first.pk).update(planned_at=gone)
    with django_capture_on_commit_callbacks(execute=False) as queued:
        recovery.reconcile()
    assert QueueChain(run.pk, "drain") in queued, "its time is long past and nothing came: the drain was lost"


def test_the_node_waits_for_its_users_time_by_its_own_clock_and_never_longer_than_the_bound():
    now, slept = 1_000_000.0, []

    def command(at):
        return StepCommand(run=1, node="gw1", version="2.2.0", at=at)

    assert node_steps.until_logoff(command(now + 42.5), clock=lambda: now, sleep=slept.append) == 42.5
    assert node_steps.until_logoff(command(now - 3), clock=lambda: now, sleep=slept.append) == 0.0
    assert node_steps.until_logoff(command(None), clock=lambda: now, sleep=slept.append) == 0.0
    assert node_steps.until_logoff(command(now + 86400), clock=lambda: now, sleep=slept.append) == LONGEST_LOGOFF_WAIT
    assert slept == [42.5, LONGEST_LOGOFF_WAIT], "a time a day off is a wrong clock: it waits the bound, no more"


def test_a_lead_above_what_a_node_waits_is_a_configuration_error(settings):
    settings.TGP_DRAIN_AHEAD = LONGEST_LOGOFF_WAIT + 1
    assert "tgpadmin.E002" in [m.id for m in run_checks()]
    settings.TGP_DRAIN_AHEAD = LONGEST_LOGOFF_WAIT
    assert "tgpadmin.E002" not in [m.id for m in run_checks()]


@pytest.mark.django_db(transaction=True)
@pytest.mark.workflow
@pytest.mark.timeout(300)
def test_a_cluster_node_is_logged_off_at_its_time_by_a_drain_queued_ahead_of_it(demo_repo, make_node, agent_for):
    # Real agents and the control worker (TGP_DRAIN_AHEAD 60 s, the default): the
    # update slot is held from the node's exit from the load balancer (3 s before its time).
    demo_repo[0].import_releases()
    cluster, nodes = make_cluster(make_node, agent_for, 2, cap=2, lead=3, expected=8)
    schedule = schedule_in(cluster, 12, download_lead=8)
    runs = run_schedule(schedule, nodes)

    assert {run.state for run in runs.values()} == {"succeeded"}, [run.error for run in runs.values()]
    for entry in PlanEntry.objects.filter(plan__schedule=schedule).select_related("node"):
        run = runs[entry.node.hostname]
        slot = UpdateStep.objects.get(run=run, name="slot")
        assert slot.finished_at < entry.planned_at - timedelta(seconds=1.5), "the slot was taken ahead of the time"
        on_time(moments(run)["off"], entry.planned_at, f"{entry.node}'s users are logged off at their time, not before")
