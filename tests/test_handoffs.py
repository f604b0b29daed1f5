"""Hand-offs between the steps of a run: what keeps a node's time out of service
short when a whole cluster updates at once (bench/rollout.py measures how short)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from celery import signature
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from agent import tasks as node_tasks
from agent.shared.protocol import Snapshot
from nodes.models import Cluster, Node
from tgpadmin.celery import app
from updates import trust
from updates.models import UpdateRun, UpdateStep
from updates.runs import chains, cluster_cap, end, recovery, reports, snapshots, start, verify
from updates.runs.chains import QueueChain

pytestmark = pytest.mark.django_db


@pytest.fixture
def cluster():
    # A name of its own: the slots live in the session's Redis.
    return Cluster.objects.create(name=f"handoff-{uuid.uuid4().hex[:8]}", max_parallel_updates=1)


def started(node, release, capture):
    with capture(execute=False):
        return start.start_update(Node.objects.get(pk=node.pk), release)


def test_a_cluster_node_downloads_before_it_takes_a_slot(make_node, cluster):
    node = make_node("c", cluster=cluster)
    steps = start.plan_steps(node, UpdateRun.Trigger.MANUAL)
    assert steps.index("download") < steps.index("slot") < steps.index("drain")
    single = start.plan_steps(make_node("gw"), UpdateRun.Trigger.MANUAL)
    assert single[:3] == ["notify", "download", "drain"], "a single system too downloads before it logs anyone off"


def test_a_freed_slot_goes_to_the_longest_waiter_at_once(
    make_node, cluster, releases, django_capture_on_commit_callbacks
):
    first = started(make_node("c", cluster=cluster), releases["2.2.0"], django_capture_on_commit_callbacks)
    second = started(make_node("c", cluster=cluster), releases["2.2.0"], django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=False):
        cluster_cap.take_slot(first.pk)
    with pytest.raises(cluster_cap.SlotWait), django_capture_on_commit_callbacks(execute=False):
        cluster_cap.take_slot(second.pk)

    with django_capture_on_commit_callbacks(execute=False) as queued:
        assert end.complete_run(first.pk)

    # No control.slot retry ran, and none had to: the waiter holds the slot already.
    assert UpdateStep.objects.get(run=second, name="slot").state == "succeeded"
    assert [h.node for h in cluster_cap.cluster_slots().holders(cluster.name)] == [second.node.hostname]
    assert queued == [QueueChain(second.pk, "drain")], "the waiter's next steps are queued once the hand-off commits"
    cluster_cap.release_slot(second.node)


@pytest.fixture
def in_line(make_node, cluster, releases, django_capture_on_commit_callbacks):
    """Two runs in a cluster with one slot: the first holds it, the second waits in line."""
    first = started(make_node("c", cluster=cluster), releases["2.2.0"], django_capture_on_commit_callbacks)
    second = started(make_node("c", cluster=cluster), releases["2.2.0"], django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=False):
        cluster_cap.take_slot(first.pk)
        with pytest.raises(cluster_cap.SlotWait):
            cluster_cap.take_slot(second.pk)
    yield first, second
    for run in (first, second):
        cluster_cap.cluster_slots().release(cluster.name, run.node.hostname)


def join_line(count, make_node, cluster, releases, capture) -> list[UpdateRun]:
    """`count` more nodes of the (full) cluster start and wait in line for a slot: their runs."""
    runs = [started(make_node("c", cluster=cluster), releases["2.2.0"], capture) for _ in range(count)]
    with capture(execute=False):
        for run in runs:
            with pytest.raises(cluster_cap.SlotWait):
                cluster_cap.take_slot(run.pk)
    return runs


def statements(queries: CaptureQueriesContext) -> list[str]:
    """What a piece of code asked the database, without transaction control (BEGIN,
    SAVEPOINT, ...: a test runs inside a transaction, production does not)."""
    control = ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK")
    return [q["sql"] for q in queries.captured_queries if not q["sql"].upper().startswith(control)]


def test_a_release_hands_the_slot_on_in_a_few_queries_however_long_the_line(
    in_line, make_node, cluster, releases, django_capture_on_commit_callbacks, monkeypatch
):
    # complete -> the next waiter's drain is the slot's critical path: while it runs, a
    # slot of the cluster stands idle. For the waiter two reads and two writes, its chain
    # queued from the objects at hand: 9 statements in all (it was 13, 8 of them the waiter's).
    first, second = in_line
    line = [second, *join_line(2, make_node, cluster, releases, django_capture_on_commit_callbacks)]
    sent: list = []
    monkeypatch.setattr("celery.canvas._chain.apply_async", lambda chain, *a, **k: sent.append(chain))
    costs = []
    for holder, waiter in zip([first, *line], line, strict=False):  # lines of 3, 2 and 1 waiting
        with CaptureQueriesContext(connection) as queries:
            with django_capture_on_commit_callbacks(execute=False) as queued:
                assert end.complete_run(holder.pk)
            assert queued == [QueueChain(waiter.pk, "drain")], "the waiter's chain is queued once, after the commit"
            queued[0]()
        assert UpdateStep.objects.get(run=waiter, name="slot").state == "succeeded", "the longest waiter goes on"
        assert [sig.task for sig in sent[-1].tasks][:2] == ["node.drain", "node.install"]
        assert sent[-1].tasks[0].args[0]["body"]["command"]["fence"] == UpdateRun.objects.get(pk=waiter.pk).slot_token
        costs.append(statements(queries))
    assert len({len(c) for c in costs}) == 1, "a line of 3 costs the hand-off what a line of 1 does"
    assert len(costs[0]) <= 9, "\n".join(sql[:120] for sql in costs[0])


def test_a_node_waiting_in_line_is_not_failed_as_silent(in_line, settings):
    _, second = in_line
    settings.TGP_RUN_STALL_TIMEOUT = 60
    UpdateRun.objects.filter(pk=second.pk).update(last_activity_at=timezone.now() - timedelta(hours=2))
    recovery.reap_stale_runs()
    assert UpdateRun.objects.get(pk=second.pk).state == "running", "waiting for a slot is not silence"


def test_the_reconciler_leaves_a_long_line_alone_at_a_cost_that_does_not_grow_with_it(
    in_line, make_node, cluster, releases, django_capture_on_commit_callbacks
):
    def reconcile_quietly() -> tuple[int, int]:
        UpdateRun.objects.update(last_activity_at=timezone.now() - timedelta(hours=1))  # all quiet for long
        with CaptureQueriesContext(connection) as queries, django_capture_on_commit_callbacks(execute=False) as queued:
            recovery.reconcile()
        return len(queries), len(queued)

    short = reconcile_quietly()
    join_line(2, make_node, cluster, releases, django_capture_on_commit_callbacks)
    long = reconcile_quietly()
    assert short[1] == long[1] == 0, "the cluster is full: nothing to queue for anyone in line"
    assert long[0] == short[0], "three waiters cost the reconciler what one does"
    assert set(UpdateStep.objects.filter(name="slot").values_list("state", flat=True)) == {"succeeded", "running"}


def test_the_reconciler_hands_on_a_slot_whose_release_woke_nobody(in_line, cluster, django_capture_on_commit_callbacks):
    first, second = in_line
    # The slot was freed, but the control worker died before it woke the waiter.
    cluster_cap.cluster_slots().release(cluster.name, first.node.hostname)
    with django_capture_on_commit_callbacks(execute=False) as queued:
        recovery.reconcile()
    assert UpdateStep.objects.get(run=second, name="slot").state == "succeeded"
    assert [h.node for h in cluster_cap.cluster_slots().holders(cluster.name)] == [second.node.hostname]
    assert queued == [QueueChain(second.pk, "drain")], "its next steps are queued once"


def test_a_waiter_that_holds_its_slot_already_goes_on_even_in_a_full_cluster(
    in_line, cluster, django_capture_on_commit_callbacks
):
    first, second = in_line
    # The second run's slot step took the slot and was cut short before it said so
    # (the control worker killed): Redis counts it as a holder, the database as waiting.
    cluster_cap.cluster_slots().release(cluster.name, first.node.hostname)
    assert cluster_cap.cluster_slots().acquire(cluster.name, second.node.hostname, 1)
    assert cluster_cap.cluster_slots().acquire(cluster.name, first.node.hostname, 1) is None, "the cluster is full"
    with django_capture_on_commit_callbacks(execute=False):
        assert cluster_cap.wake_waiters(cluster) == 1
    assert UpdateStep.objects.get(run=second, name="slot").state == "succeeded"


@pytest.fixture
def rebooting(make_node, releases, django_capture_on_commit_callbacks):
    """A run to 2.2.0 (which needs a reboot) on a node that was on boot-1, and the
    snapshot of that node back on 2.2.0 after a new boot."""
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0", boot_id="boot-1")
    run = started(node, releases["2.2.0"], django_capture_on_commit_callbacks)
    assert run.release.needs_reboot
    packages = {p.name: p.version for p in releases["2.2.0"].packages.all()}

    def back(**fields):
        return {"installed_version": "2.2.0", "packages": packages, "boot_id": "boot-2", "taken_at": time.time(),
                **fields}  # fmt: skip

    return run, node.hostname, back


def test_verify_takes_the_snapshot_the_chain_hands_over(rebooting):
    run, hostname, back = rebooting
    # What node.reboot returned: the node runs 2.2.0 after a new boot. Its own report
    # is still queued, so the database knows nothing of it yet.
    verify.verify_node_back(run.pk, back())  # NodeNotBack if it waited for the report
    step = UpdateStep.objects.get(run=run, name="verify")
    assert step.state == "succeeded"
    assert step.started_at <= step.finished_at, "the run page shows when verify found the node back"
    assert f"{hostname} runs 2.2.0, boot boot-2" in step.detail, "and what it found"
    assert Node.objects.get(hostname=hostname).installed_version == "2.2.0"


def test_a_node_is_back_from_its_reboot_once_its_agent_takes_work_again(rebooting):
    run, hostname, back = rebooting
    # The supervisor reports the new boot and the worker it just started, which is
    # still importing: the chain's next step would only wait for it in the queue.
    snapshots.store_snapshot(hostname, back(agent_instance="agent-2"))
    with pytest.raises(verify.NodeNotBack):
        verify.verify_node_back(run.pk)
    snapshots.store_snapshot(hostname, back(agent_instance="agent-2", worker=True))  # the worker's own report
    verify.verify_node_back(run.pk)
    assert UpdateStep.objects.get(run=run, name="verify").state == "succeeded"


def test_a_ready_report_processed_after_a_later_heartbeat_still_counts(rebooting):
    run, hostname, back = rebooting
    ready = back(agent_instance="agent-2", worker=True)
    snapshots.store_snapshot(hostname, back(agent_instance="agent-2"), seq=11)  # the supervisor's next beat, later
    snapshots.store_snapshot(hostname, ready, seq=10)  # two control processes: the ready report lands second
    snapshots.store_snapshot(hostname, back(boot_id="boot-1", agent_instance="agent-1", worker=True), seq=1)
    # ... and a late report of the worker that rebooted changes nothing.
    verify.verify_node_back(run.pk)
    assert UpdateStep.objects.get(run=run, name="verify").state == "succeeded"


def test_a_lost_ready_report_delays_verify_but_does_not_fail_the_run(rebooting):
    run, hostname, back = rebooting
    snapshots.store_snapshot(hostname, back(agent_instance="agent-2"))  # only the supervisor got through
    rebooted_at = timezone.now() - verify.WORKER_GRACE - timedelta(seconds=1)
    UpdateStep.objects.filter(run=run, name="reboot").update(state="succeeded", finished_at=rebooted_at)
    verify.verify_node_back(run.pk)  # resume waits for the worker in its queue, as before ready reports
    assert UpdateStep.objects.get(run=run, name="verify").state == "succeeded"


def test_the_workers_ready_report_carries_a_waiting_verify_on_and_only_one_verify_does(
    rebooting, django_capture_on_commit_callbacks
):
    run, hostname, back = rebooting
    snapshots.store_snapshot(hostname, back(agent_instance="agent-2"))  # the supervisor
    with pytest.raises(verify.NodeNotBack):
        verify.verify_node_back(run.pk)  # the chain's verify: now waiting for its retry

    with django_capture_on_commit_callbacks(execute=False) as heartbeat:
        recovery.node_reported(hostname, back(agent_instance="agent-2"))
    with django_capture_on_commit_callbacks(execute=False) as ready:
        recovery.node_reported(hostname, back(agent_instance="agent-2", worker=True))
    assert heartbeat == [], "a heartbeat queues nothing"
    assert ready == [QueueChain(run.pk, "verify")], "the worker's report queues verify again"

    verify.verify_node_back(run.pk)  # the one queued by the ready report
    with pytest.raises(verify.CarriedOn):
        verify.verify_node_back(run.pk)  # the chain's retry: its chain stops, no second resume
    assert UpdateStep.objects.get(run=run, name="verify").state == "succeeded"


def test_a_succeeded_run_shows_its_node_back_in_service_at_once(
    make_node, releases, django_capture_on_commit_callbacks
):
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(logon_enabled=False, installed_version="2.1.0")
    run = started(node, releases["2.2.0"], django_capture_on_commit_callbacks)
    # What node.resume returned; its own report is still queued behind control.complete.
    snapshot = {"installed_version": "2.2.0", "logon_enabled": True, "boot_id": "b", "taken_at": time.time()}
    assert end.complete_run(run.pk, snapshot)
    node.refresh_from_db()
    assert node.logon_enabled and not node.maintenance_mode


def test_step_times_are_the_nodes_own_not_when_the_report_was_processed(
    make_node, releases, django_capture_on_commit_callbacks
):
    run = started(make_node("gw"), releases["2.2.0"], django_capture_on_commit_callbacks)
    began = time.time() - 42  # the report waited 42 s in a busy control queue
    reports.record_step(run.pk, "notify", "started", at=began)
    reports.record_step(run.pk, "notify", "succeeded", at=began + 1)
    notify = UpdateStep.objects.get(run=run, name="notify")
    assert notify.started_at == datetime.fromtimestamp(began, tz=UTC)
    assert notify.finished_at - notify.started_at == timedelta(seconds=1)


def test_a_node_clock_ahead_of_ours_is_capped_at_now(make_node, releases, django_capture_on_commit_callbacks):
    run = started(make_node("gw"), releases["2.2.0"], django_capture_on_commit_callbacks)
    reports.record_step(run.pk, "notify", "started", at=time.time() + 3600)
    assert UpdateStep.objects.get(run=run, name="notify").started_at <= timezone.now()


def fetched_tasks(queue: str, count: int) -> list[str]:
    """The names of the next `count` tasks taken from `queue`, as a worker takes them."""
    with app.connection_for_read() as conn:
        inbox = conn.SimpleQueue(queue)
        try:
            fetched = []
            for _ in range(count):
                message = inbox.get(timeout=5)
                message.ack()
                fetched.append(message.headers["task"])
        finally:
            inbox.close()
    return fetched


def test_reports_and_slot_requests_queue_behind_the_chains_control_steps(
    monkeypatch, make_node, cluster, releases, agent_settings, django_capture_on_commit_callbacks
):
    run = started(make_node("c", cluster=cluster), releases["2.2.0"], django_capture_on_commit_callbacks)
    # A queue of its own, so that no control worker of the session takes the messages.
    queue = f"control-order-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(node_tasks, "report_queue", queue)
    node_tasks.report_node(run.node.hostname, Snapshot(taken_at=time.time()))
    (slot,) = chains.build_chain(run, "slot").tasks  # the slot request as a run's chain carries it
    slot.set(queue=queue).apply_async()
    signature("control.complete", args=(trust.go(1, "complete"),), immutable=True).set(queue=queue).apply_async()

    fetched = fetched_tasks(queue, 3)
    # Sent last, fetched first: a node out of service does not wait behind reports or slot requests.
    assert fetched == ["control.complete", "control.node_report", "control.slot"]


def scheduled_cluster_run(make_node, cluster, releases, capture) -> UpdateRun:
    """A time-controlled cluster update's run of a new node, an hour ahead (chains captured)."""
    node = Node.objects.get(pk=make_node("c", cluster=cluster).pk)
    with capture(execute=False):
        return start.start_update(
            node, releases["2.2.0"], trigger=UpdateRun.Trigger.SCHEDULED,
            scheduled_for=timezone.now() + timedelta(hours=1),
        )  # fmt: skip


def test_a_node_that_held_its_users_until_its_time_asks_for_its_slot_ahead_of_the_reports(
    monkeypatch, make_node, cluster, releases, agent_settings, django_capture_on_commit_callbacks
):
    # A time-controlled cluster update: the node left the load balancer and held its
    # users until its planned time; their logoff must not wait behind other nodes' reports.
    run = scheduled_cluster_run(make_node, cluster, releases, django_capture_on_commit_callbacks)
    assert "hold" in chains.step_names(run)
    queue = f"control-order-{uuid.uuid4().hex[:8]}"  # no control worker of the session takes them
    monkeypatch.setattr(node_tasks, "report_queue", queue)
    node_tasks.report_node(run.node.hostname, Snapshot(taken_at=time.time()))
    (slot, *_) = chains.build_chain(run, "slot").tasks
    slot.set(queue=queue).apply_async()
    assert fetched_tasks(queue, 2) == ["control.slot", "control.node_report"], "sent last, fetched first"


def test_a_node_whose_time_has_come_takes_its_slot_in_its_hold_not_behind_the_control_queue(
    make_node, cluster, releases, django_capture_on_commit_callbacks
):
    run = scheduled_cluster_run(make_node, cluster, releases, django_capture_on_commit_callbacks)
    chain = chains.build_chain(run, "exclude")
    assert [sig.task for sig in chain.tasks] == ["node.exclude", "control.hold"], "no slot task of its own"

    with django_capture_on_commit_callbacks(execute=False) as queued:
        cluster_cap.hold(run.pk)  # no plan entry: its time is now
    steps = dict(UpdateStep.objects.filter(run=run).values_list("name", "state"))
    assert steps["hold"] == steps["slot"] == "succeeded"
    assert [c.from_step for c in queued if isinstance(c, QueueChain)] == ["drain"], "its users are logged off next"


def test_a_hold_whose_cluster_has_no_free_slot_puts_its_node_in_line_without_failing(
    make_node, cluster, releases, django_capture_on_commit_callbacks
):
    run = scheduled_cluster_run(make_node, cluster, releases, django_capture_on_commit_callbacks)
    assert cluster_cap.cluster_slots().acquire(cluster.name, "another-node", 1), "the cluster's one slot is taken"
    with django_capture_on_commit_callbacks(execute=False) as queued:
        cluster_cap.hold(run.pk)  # no SlotWait: a release hands the slot on
    assert UpdateStep.objects.in_line().filter(run=run, name="slot").exists()
    assert UpdateStep.objects.get(run=run, name="hold").state == "succeeded"
    assert not [c for c in queued if isinstance(c, QueueChain)], "nobody is logged off"


def test_a_slot_taken_as_it_is_freed_is_recorded_as_held_after_the_release(
    make_node, cluster, releases, django_capture_on_commit_callbacks, monkeypatch
):
    first = started(make_node("c", cluster=cluster), releases["2.2.0"], django_capture_on_commit_callbacks)
    second = started(make_node("c", cluster=cluster), releases["2.2.0"], django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=False):
        cluster_cap.take_slot(first.pk)
    slots = cluster_cap.cluster_slots()
    acquire = slots.acquire

    def freed_meanwhile(*args, **kwargs):
        # Another control process completes the first run while the second asks (and
        # has not yet woken the line: this ask is what takes the slot).
        monkeypatch.setattr(slots, "acquire", acquire)
        UpdateRun.objects.filter(pk=first.pk).update(state="succeeded", finished_at=timezone.now())
        slots.release(cluster.name, first.node.hostname)
        return acquire(*args, **kwargs)

    monkeypatch.setattr(slots, "acquire", freed_meanwhile)
    with django_capture_on_commit_callbacks(execute=False):
        cluster_cap.take_slot(second.pk)
    held_at = UpdateStep.objects.get(run=second, name="slot").finished_at
    assert held_at >= UpdateRun.objects.get(pk=first.pk).finished_at, "never two nodes in one slot, on the record"
    slots.release(cluster.name, second.node.hostname)


def test_raising_the_cap_lets_the_longest_waiter_go_on_at_once(
    in_line, cluster, admin_client, django_capture_on_commit_callbacks
):
    _, second = in_line
    form = {"name": cluster.name, "max_parallel_updates": 2, "lb_lead_time": "01:00:00", "expected_update": "00:30:00"}
    with django_capture_on_commit_callbacks(execute=False) as saved:
        page = admin_client.post(reverse("admin:nodes_cluster_change", args=[cluster.pk]), form)
    assert page.status_code == 302
    with django_capture_on_commit_callbacks(execute=False):  # its chain is not what this test is about
        for callback in saved:
            callback()
    assert UpdateStep.objects.get(run=second, name="slot").state == "succeeded"


def test_a_node_waits_for_a_place_out_of_the_load_balancer_and_gets_the_first_one_freed(
    make_node, releases, django_capture_on_commit_callbacks
):
    # Two update slots, but one place out of the load balancer: the second node may not
    # leave it while the first is out, and goes on as soon as the first is back.
    # (Below the cap, which the admin refuses: here only the semaphore is tested.)
    cluster = Cluster.objects.create(name=f"out-{uuid.uuid4().hex[:8]}", max_parallel_updates=2, max_out_of_lb=1)
    runs = []
    for _ in range(2):
        node = make_node("c", cluster=cluster)
        run = UpdateRun.objects.create(node=node, release=releases["2.2.0"], trigger="scheduled")
        names = start.plan_steps(node, UpdateRun.Trigger.SCHEDULED)
        UpdateStep.objects.bulk_create(UpdateStep(run=run, name=name, position=i) for i, name in enumerate(names))
        runs.append(run)
    first, second = runs
    with django_capture_on_commit_callbacks(execute=False) as queued:
        cluster_cap.take_slot(first.pk, "leave")
        with pytest.raises(cluster_cap.SlotWait):
            cluster_cap.take_slot(second.pk, "leave")
    assert queued == [QueueChain(first.pk, "exclude")], "only the first leaves"
    assert "places out of the load balancer" in UpdateStep.objects.get(run=second, name="leave").detail

    with django_capture_on_commit_callbacks(execute=False) as queued:
        cluster_cap.release_slot(first.node)
    assert queued == [QueueChain(second.pk, "exclude")], "the waiter leaves as the first is back"
    assert [h.node for h in cluster_cap.out_places().holders(cluster.name)] == [second.node.hostname]
    cluster_cap.release_slot(second.node)
