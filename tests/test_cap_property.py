"""A property of the control plane, over random clusters, caps, interleavings
and injected failures: never more nodes out of service than the cap, and none
without a slot; a failed node keeps its slot until its maintenance is ended; a
node is back from its reboot only once its new agent's worker takes work; and
every node ends updated or locked.

The run functions run for real (database, Redis slots and their Lua scripts);
hypothesis plays the agents and the order in which messages arrive. Celery messages
the functions would send are captured and not delivered: here the interleaving is
the test's to choose. What the checks read is what the system recorded: the step
rows, the node rows and the slot holders in Redis, not the test's own bookkeeping."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes import services
from nodes.models import Cluster, Node
from tests.conftest import accept_key
from updates.models import UpdateLock, UpdateRun, UpdateStep
from updates.runs import cluster_cap, end, recovery, reports, start, verify

pytestmark = pytest.mark.django_db


@dataclass
class Sim:
    """One node's agent, as the test plays it."""

    run: UpdateRun
    steps: list[str]
    fail_at: str | None
    boot: str
    agent: str
    index: int = 0
    failed: bool = False
    maintenance_ended: bool = False
    rebooted: bool = False  # the supervisor reported the new boot (and its new worker)
    worker_ready: bool = False  # that worker reported that it takes work
    verify_waited: bool = False  # verify found the node not back since the last report

    @property
    def active(self) -> bool:
        return not self.failed and self.index < len(self.steps)

    @property
    def hostname(self) -> str:
        return self.run.node.hostname


def snapshot(sim: Sim, *, worker: bool, **changes: Any) -> dict[str, Any]:
    """The node as its agent reports it: every field, as the real agent sends it."""
    node = Node.objects.get(pk=sim.run.node_id)
    return {
        "installed_version": node.installed_version, "packages": node.installed_packages, "users": [],
        "boot_id": sim.boot, "agent_instance": sim.agent, "worker": worker, "taken_at": time.time(), **changes,
    }  # fmt: skip


def node_step(sim: Sim, step: str) -> None:
    run = sim.run
    reports.record_step(run.pk, step, "started")
    if sim.fail_at == step:
        reports.record_step(run.pk, step, "failed", detail="injected")
        sim.failed = True
        return
    changes = {}
    if step == "install":
        changes = {"installed_version": "2.2.0", "packages": dict(run.release.packages.values_list("name", "version"))}
    # An outcome carries the node's snapshot, taken by the step's worker (before a reboot: the old boot).
    reports.record_step(
        run.pk, step, "succeeded", snapshot=snapshot(sim, worker=True, **changes), hostname=sim.hostname
    )
    sim.index += 1


def verify_step(sim: Sim, data: st.DataObject) -> None:
    """What happens while verify waits for the node: the supervisor reports the new
    boot (its new worker still starting), the worker reports itself, or verify looks."""
    options = ["verify"] if not sim.verify_waited else []
    if not sim.rebooted:
        options.append("boot")
    elif not sim.worker_ready:
        options.append("ready")
    event = data.draw(st.sampled_from(options))
    if event == "boot":
        sim.boot, sim.agent, sim.rebooted, sim.verify_waited = uuid.uuid4().hex, uuid.uuid4().hex, True, False
        recovery.node_reported(sim.hostname, snapshot(sim, worker=False))
    elif event == "ready":
        sim.worker_ready, sim.verify_waited = True, False
        recovery.node_reported(sim.hostname, snapshot(sim, worker=True))
    else:
        node = Node.objects.get(pk=sim.run.node_id)
        # Back, as the node row records it: a new boot, and the worker of the agent now reporting takes work.
        back = node.boot_id != sim.run.boot_id_before and node.worker_instance == node.agent_instance
        assert back == (sim.rebooted and sim.worker_ready), "the node row holds what its agent reported"
        if back:
            verify.verify_node_back(sim.run.pk)
            sim.index += 1
        else:
            with pytest.raises(verify.NodeNotBack):
                verify.verify_node_back(sim.run.pk)
            sim.verify_waited = True


def advance(sim: Sim, data: st.DataObject) -> None:
    step = sim.steps[sim.index]
    if step == "slot":
        try:
            cluster_cap.take_slot(sim.run.pk)
        except cluster_cap.SlotWait:
            return  # waits; it does not fail
        sim.index += 1
    elif step == "verify":
        verify_step(sim, data)
    else:
        node_step(sim, step)
    if sim.index == len(sim.steps):
        assert end.complete_run(sim.run.pk)


def end_maintenance(sim: Sim) -> None:
    node = Node.objects.get(pk=sim.run.node_id)
    assert services.end_maintenance(node)
    # end_maintenance frees the slot after commit; this test's transaction never commits.
    cluster_cap.release_slot(node)
    sim.maintenance_ended = True


def holders(cluster: Cluster) -> set[str]:
    return {h.node for h in cluster_cap.cluster_slots().holders(cluster.name)}


def out_of_service(cluster: Cluster) -> set[str]:
    """The nodes out of service, as the database records it: drained (their drain step
    began) and not back (still in maintenance mode: a run that succeeded, or an
    operator, ended it)."""
    drained = UpdateStep.objects.filter(run__node__cluster=cluster, name="drain").exclude(state="pending")
    return set(drained.filter(run__node__maintenance_mode=True).values_list("run__node__hostname", flat=True))


def failed_in_maintenance_with_a_slot(cluster: Cluster) -> set[str]:
    """Failed after they took a slot, and their maintenance not ended."""
    runs = UpdateRun.objects.filter(node__cluster=cluster, state="failed", node__maintenance_mode=True)
    slot_taken = UpdateStep.objects.filter(name="slot", state="succeeded")
    return set(runs.filter(pk__in=slot_taken.values("run_id")).values_list("node__hostname", flat=True))


def most_at_once(intervals: list[tuple[datetime, datetime]]) -> int:
    """How many of the intervals overlap at most (an end before a start at the same time)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    now = peak = 0
    for _, change in events:
        now += change
        peak = max(peak, now)
    return peak


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    nodes=st.integers(min_value=1, max_value=6),
    cap=st.integers(min_value=1, max_value=3),
    failures=st.lists(st.sampled_from([None, "notify", "drain", "download", "install", "reboot"]), max_size=6),
    data=st.data(),
)
def test_the_cap_holds_and_every_node_ends_updated_or_locked(
    releases, django_capture_on_commit_callbacks, nodes, cap, failures, data
):
    cluster = Cluster.objects.create(name=f"p{uuid.uuid4().hex[:10]}", max_parallel_updates=cap)
    sims = []
    with django_capture_on_commit_callbacks(execute=False):
        for i in range(nodes):
            boot, agent = uuid.uuid4().hex, uuid.uuid4().hex
            node = Node.objects.create(
                hostname=f"{cluster.name}-{i}", cluster=cluster, installed_version="2.1.0",
                boot_id=boot, agent_instance=agent, worker_instance=agent,
            )  # fmt: skip
            accept_key(node)
            run = start.start_update(node, releases["2.2.0"])
            fail_at = failures[i] if i < len(failures) else None
            sims.append(Sim(run, start.plan_steps(node, run.trigger), fail_at, boot, agent))
        for _ in range(nodes * 60):
            held = holders(cluster)
            stopped = [s for s in sims if s.failed and not s.maintenance_ended and s.hostname in held]
            movable = [s for s in sims if s.active] + stopped
            if not movable:
                break
            sim = data.draw(st.sampled_from(movable))
            if sim in stopped:
                if data.draw(st.booleans()):
                    end_maintenance(sim)
            else:
                advance(sim, data)
            held, drained = holders(cluster), out_of_service(cluster)
            assert len(held) <= cap
            assert len(drained) <= cap, f"out of service: {sorted(drained)}"
            assert drained <= held, f"out of service without a slot: {sorted(drained - held)}"
            assert failed_in_maintenance_with_a_slot(cluster) <= held, "a failed node keeps its slot"
    steps = {(s.run_id, s.name): s for s in UpdateStep.objects.filter(run__node__cluster=cluster)}
    for sim in sims:
        run = UpdateRun.objects.get(pk=sim.run.pk)
        node = Node.objects.get(pk=run.node_id)
        if run.state == "succeeded":
            assert node.installed_version == "2.2.0"
        else:
            assert run.state == "failed", f"{node} still {run.state} after {sim.index} steps"
            assert UpdateLock.objects.filter(node=node, removed_at=None).exists()
    # The same, from the steps' own times: from drain to resume, never more than cap at once.
    succeeded = UpdateRun.objects.filter(node__cluster=cluster, state="succeeded").values_list("pk", flat=True)
    spans = [(steps[run, "drain"].started_at, steps[run, "resume"].finished_at) for run in succeeded]
    assert most_at_once(spans) <= cap
