"""The cluster cap: six nodes, at most two at once, random step durations, all six
started at once as the admin starts a selection. Sampled throughout the rollout,
never more than two nodes are out of service."""

from __future__ import annotations

import json
import time

import pytest

from nodes import services
from nodes.models import Cluster, Node
from tests.conftest import wait_for
from updates.models import Release, UpdateRun
from updates.runs import cluster_cap

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workflow, pytest.mark.timeout(300)]


def out_of_service(state_dir, nodes) -> int:
    """Nodes whose users cannot work: out of the load balancer or logon off."""
    count = 0
    for node in nodes:
        state = json.loads((state_dir / node.hostname / "state.json").read_text())
        count += not (state["in_load_balancer"] and state["logon_enabled"])
    return count


def test_never_more_nodes_out_of_service_than_the_cap_and_all_end_updated(demo_repo, make_node, agent_for, state_dir):
    repo, _ = demo_repo
    repo.import_releases()
    cluster = Cluster.objects.create(name="six", max_parallel_updates=2)
    nodes = [make_node("c", cluster=cluster, users=("u",)) for _ in range(6)]
    for node in nodes:
        agent_for(node, TGP_SIM_STEP_SECONDS="0.2-0.8")
    # Started as the node list's Auto-Update starts a selection: the whole cluster in one go.
    plans = services.plan_updates(list(Node.objects.filter(cluster=cluster)))
    assert {plan.release for plan in plans} == {Release.objects.get(version="2.2.0")}
    runs, refused = services.start_planned(plans, user=None)
    assert len(runs) == 6 and not refused

    samples, peak_slots = [], 0
    deadline = time.monotonic() + 240
    while UpdateRun.objects.filter(pk__in=[r.pk for r in runs], state="running").exists():
        assert time.monotonic() < deadline, "the rollout did not end"
        samples.append(out_of_service(state_dir, nodes))
        peak_slots = max(peak_slots, len(cluster_cap.cluster_slots().holders(cluster.name)))
        time.sleep(0.02)

    assert max(samples) == 2, f"peak out of service {max(samples)} (cap 2), {len(samples)} samples"
    assert peak_slots <= 2
    assert set(UpdateRun.objects.filter(pk__in=[r.pk for r in runs]).values_list("state", flat=True)) == {"succeeded"}
    assert set(Node.objects.filter(cluster=cluster).values_list("installed_version", flat=True)) == {"2.2.0"}
    assert out_of_service(state_dir, nodes) == 0
    wait_for(lambda: not cluster_cap.cluster_slots().holders(cluster.name), 10, "every slot to be released")
