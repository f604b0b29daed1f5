"""A property of the control plane, over random clusters, caps, interleavings
and injected failures: never more nodes out of service than the cap, a failed
node keeps its slot until its maintenance is ended, and every node ends updated
or locked.

The workflow functions run for real (database, Redis slots and their Lua
scripts); hypothesis plays the agents and the order in which messages arrive.
Celery messages the functions would send are captured and not delivered: here
the interleaving is the test's to choose."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodes import services
from nodes.models import Cluster, Node
from updates.models import UpdateLock, UpdateRun
from updates.runs import cluster_cap, end, reports, start, verify

pytestmark = pytest.mark.django_db

NODE_STEPS = {"notify", "drain", "download", "install", "reboot", "resume"}


@dataclass
class Sim:
    run: UpdateRun
    steps: list[str]
    fail_at: str | None
    index: int = 0
    out_of_service: bool = False
    waiting_for_maintenance: bool = False
    events: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.index < len(self.steps) and not self.waiting_for_maintenance and self.fail_at != "done"


def node_step(sim: Sim, step: str) -> None:
    run, node = sim.run, sim.run.node
    reports.record_step(run.pk, step, "started")
    if step == "drain":
        sim.out_of_service = True
    if sim.fail_at == step:
        reports.record_step(run.pk, step, "failed", detail="injected")
        sim.fail_at = "done"
        held = node.hostname in {h.node for h in cluster_cap.cluster_slots().holders(node.cluster.name)}
        sim.waiting_for_maintenance = held or sim.out_of_service
        return
    snapshot = None
    if step == "install":
        snapshot = {"installed_version": "2.2.0", "packages": dict(run.release.packages.values_list("name", "version"))}
    if step == "reboot":
        snapshot = {**(snapshot or {}), "installed_version": "2.2.0", "boot_id": uuid.uuid4().hex}
        snapshot["packages"] = dict(run.release.packages.values_list("name", "version"))
    reports.record_step(run.pk, step, "succeeded", snapshot=snapshot, hostname=node.hostname if snapshot else "")
    if step == "resume":
        sim.out_of_service = False


def advance(sim: Sim) -> None:
    step = sim.steps[sim.index]
    if step == "slot":
        try:
            cluster_cap.take_slot(sim.run.pk)
        except cluster_cap.SlotWait:
            return  # waits; it does not fail
    elif step == "verify":
        verify.verify_node_back(sim.run.pk)
    else:
        node_step(sim, step)
        if sim.fail_at == "done":
            return
    sim.index += 1
    if sim.index == len(sim.steps):
        assert end.complete_run(sim.run.pk)


def end_maintenance(sim: Sim) -> None:
    node = Node.objects.get(pk=sim.run.node_id)
    assert services.end_maintenance(node)
    # end_maintenance frees the slot after commit; this test's transaction never commits.
    cluster_cap.cluster_slots().release(node.cluster.name, node.hostname)
    sim.waiting_for_maintenance = sim.out_of_service = False


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
            node = Node.objects.create(hostname=f"{cluster.name}-{i}", cluster=cluster, installed_version="2.1.0")
            run = start.start_update(node, releases["2.2.0"])
            fail_at = failures[i] if i < len(failures) else None
            sims.append(Sim(run, start.plan_steps(node, run.trigger), fail_at))
        for _ in range(nodes * 40):
            movable = [s for s in sims if s.active or s.waiting_for_maintenance]
            if not movable:
                break
            sim = data.draw(st.sampled_from(movable))
            if sim.waiting_for_maintenance:
                if data.draw(st.booleans()):
                    end_maintenance(sim)
            else:
                advance(sim)
            assert sum(s.out_of_service for s in sims) <= cap
            assert len(cluster_cap.cluster_slots().holders(cluster.name)) <= cap
            for s in sims:
                if s.waiting_for_maintenance:
                    assert s.run.node.hostname in {h.node for h in cluster_cap.cluster_slots().holders(cluster.name)}
    for sim in sims:
        run = UpdateRun.objects.get(pk=sim.run.pk)
        node = Node.objects.get(pk=run.node_id)
        if run.state == "succeeded":
            assert node.installed_version == "2.2.0"
        else:
            assert run.state == "failed", f"{node} still {run.state} after {sim.index} steps"
            assert UpdateLock.objects.filter(node=node, removed_at=None).exists()
