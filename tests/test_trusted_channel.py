"""The trusted channel, control side: a node's messages count only when signed with
its own accepted key, and only for itself; a chain's hand-off to a control step only
when the run's own node (or the control plane) signed it; a node's sequence, not its
clock, orders its reports. The messages here are what the control worker receives:
the test signs them as a node (or an attacker holding one node's key) would."""

from __future__ import annotations

import time

import pytest
from django.urls import reverse

from agent import identity
from agent.shared import signing
from agent.shared.protocol import NodeReport, Snapshot, StepCommand, StepReport
from agent.steps import DowngradeRefused, check_not_older
from nodes import keys
from nodes.models import Cluster, Node, NodeKey
from updates import tasks as control_tasks
from updates import trust
from updates.models import UpdateRun, UpdateStep
from updates.runs import start

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_nodes(make_node, agent_settings):
    """Two enrolled nodes; the test holds both keys (their agents' state directories)."""
    return make_node("gw"), make_node("gw")


def heartbeat(node: Node, **fields) -> dict:
    snapshot = Snapshot(installed_version="2.1.0", boot_id="b1", agent_instance="a1", **fields)
    return identity.signed(node.hostname, "node_report", NodeReport(node.hostname, snapshot).to_wire())


def stored(node: Node) -> Node:
    return Node.objects.get(pk=node.pk)


def running_run(node: Node, releases, capture) -> UpdateRun:
    with capture(execute=False):
        return start.start_update(Node.objects.get(pk=node.pk), releases["2.2.0"])


def test_a_node_reports_for_itself_only(two_nodes):
    mine, victim = two_nodes
    # A report about another node, signed with the sender's own key.
    lie = NodeReport(victim.hostname, Snapshot(installed_version="9.9.9", boot_id="b1")).to_wire()
    control_tasks.node_report(identity.signed(mine.hostname, "node_report", lie))
    # The same, claiming to be signed by the victim (but with the sender's key).
    forged = signing.sign({**heartbeat(victim)["body"]}, identity.node_key(mine.hostname))
    control_tasks.node_report(forged)
    assert stored(victim).installed_version == "", "nothing about the victim was stored"

    control_tasks.node_report(heartbeat(mine))
    assert stored(mine).installed_version == "2.1.0", "a node's own report counts"


def test_nothing_an_unenrolled_or_revoked_node_says_is_trusted(two_nodes, releases):
    node, _ = two_nodes
    keys.revoke(node, None, "lost")
    control_tasks.node_report(heartbeat(node))
    assert stored(node).last_seen is None, "a revoked node is not even seen"
    with pytest.raises(start.UpdateRefused, match="has no accepted key"):
        start.start_update(stored(node), releases["2.2.0"])

    # Re-keying: the agent offers a new key, signed with it; an operator accepts it.
    identity.key_path(node.hostname).unlink()
    public, made = identity.enroll(node.hostname)
    assert made
    control_tasks.enroll(identity.signed(node.hostname, "enroll", {"hostname": node.hostname, "public_key": public}))
    offered = NodeKey.objects.get(node=node, public_key=public)
    assert offered.state == "pending"
    control_tasks.node_report(heartbeat(node))
    assert stored(node).last_seen is None, "a key that waits for an operator is not trusted yet"
    keys.accept(offered, None)
    control_tasks.node_report(heartbeat(node))
    assert stored(node).installed_version == "2.1.0"
    assert list(NodeKey.objects.filter(node=node).values_list("state", flat=True)) == ["accepted", "revoked"]


def test_a_key_offer_must_be_signed_with_the_key_it_offers(two_nodes):
    node, _ = two_nodes
    stranger = signing.public_b64(signing.Ed25519PrivateKey.generate())
    offer = identity.signed(node.hostname, "enroll", {"hostname": node.hostname, "public_key": stranger})
    control_tasks.enroll(offer)
    assert not NodeKey.objects.filter(public_key=stranger).exists()


def test_a_replayed_or_older_report_changes_nothing_and_the_nodes_clock_decides_nothing(two_nodes):
    node, _ = two_nodes
    ahead = heartbeat(node, logon_enabled=False, taken_at=time.time() + 3600)  # a clock an hour ahead
    control_tasks.node_report(ahead)
    now = heartbeat(node, logon_enabled=True, taken_at=time.time())
    control_tasks.node_report(now)
    assert stored(node).logon_enabled is True, "a later report counts, whatever the node's clock said before"
    control_tasks.node_report(ahead)  # replayed
    assert stored(node).logon_enabled is True, "a replayed (older) report changes nothing"
    assert stored(node).reported_at.timestamp() <= time.time(), "stored at the control plane's time"


def test_a_step_report_about_another_nodes_run_is_refused(two_nodes, releases, django_capture_on_commit_callbacks):
    attacker, victim = two_nodes
    run = running_run(victim, releases, django_capture_on_commit_callbacks)
    report = StepReport(run=run.pk, step="drain", event="failed", hostname=attacker.hostname, at=time.time())
    control_tasks.record_step(identity.signed(attacker.hostname, "report", report.to_wire()))
    assert UpdateRun.objects.get(pk=run.pk).state == "running", "the victim's run goes on"


def test_a_forged_completion_of_another_nodes_run_is_refused(two_nodes, releases, django_capture_on_commit_callbacks):
    attacker, victim = two_nodes
    run = running_run(victim, releases, django_capture_on_commit_callbacks)
    done = {"run": run.pk, "step": "resume", "snapshot": None}
    control_tasks.complete(identity.signed(attacker.hostname, "done", done))
    fake_go = signing.sign({"kind": "go", "signer": "control", "run": run.pk, "step": "complete"},
                           signing.Ed25519PrivateKey.generate())  # fmt: skip
    control_tasks.complete(fake_go)
    # The victim itself handing on a step that is not the one before complete: refused too.
    control_tasks.complete(identity.signed(victim.hostname, "done", {**done, "step": "notify"}))
    run.refresh_from_db()
    assert run.state == "running" and stored(victim).maintenance_mode, "nothing ended the victim's run"

    control_tasks.complete(identity.signed(victim.hostname, "done", done))
    assert UpdateRun.objects.get(pk=run.pk).state == "succeeded", "the run's own node completes it"


def test_a_forged_slot_request_for_another_nodes_run_takes_no_slot(
    make_node, releases, agent_settings, django_capture_on_commit_callbacks
):
    cluster = Cluster.objects.create(name="trust-c", max_parallel_updates=1)
    attacker, victim = make_node("c", cluster=cluster), make_node("c", cluster=cluster)
    run = running_run(victim, releases, django_capture_on_commit_callbacks)
    control_tasks.slot(identity.signed(attacker.hostname, "done", {"run": run.pk, "step": "download"}))
    assert UpdateStep.objects.get(run=run, name="slot").state == "pending"
    with django_capture_on_commit_callbacks(execute=False):
        control_tasks.slot(trust.go(run.pk, "slot"))  # the control plane's own go
    assert UpdateStep.objects.get(run=run, name="slot").state == "succeeded"


def test_the_operator_accepts_and_revokes_keys_on_the_node_page_and_others_get_403(client, staff, make_node):
    node = make_node("gw")
    public = signing.public_b64(signing.Ed25519PrivateKey.generate())
    offered = keys.offer(node, public)
    page = reverse("admin:nodes_node_change", args=[node.pk])

    client.force_login(staff("viewer"))
    assert offered.fingerprint in client.get(page).text
    assert client.post(reverse("admin:nodes_node_accept_key", args=[node.pk]), {"key": offered.pk}).status_code == 403
    assert client.post(reverse("admin:nodes_node_revoke_key", args=[node.pk])).status_code == 403

    client.force_login(staff("op", "update"))
    client.post(reverse("admin:nodes_node_accept_key", args=[node.pk]), {"key": offered.pk})
    states = dict(NodeKey.objects.filter(node=node).values_list("public_key", "state"))
    assert states[public] == "accepted" and "replaced" in states.values(), "re-keyed: the old key kept as history"
    client.post(reverse("admin:nodes_node_revoke_key", args=[node.pk]), {"note": "appliance stolen"})
    assert NodeKey.objects.get(node=node, public_key=public).state == "revoked"
    assert "appliance stolen" in client.get(page).text


def test_the_agent_refuses_an_older_release_unless_the_operator_caught_up(state_dir, agent_settings, make_node):
    from agent.drivers.simulated import SimulatedDriver

    node = make_node("gw", version="2.2.0")
    driver = SimulatedDriver(node.hostname, state_dir / node.hostname)
    with pytest.raises(DowngradeRefused, match="refusing to install the older 2.1.0"):
        check_not_older(driver, StepCommand(run=1, node=node.hostname, version="2.1.0"))
    check_not_older(driver, StepCommand(run=1, node=node.hostname, version="2.1.0", catchup=True))
    check_not_older(driver, StepCommand(run=1, node=node.hostname, version="2.2.0"))


def test_a_nodes_sequence_never_hands_out_a_number_twice(agent_settings, state_dir):
    # The supervisor and its worker number their reports from one counter; in the worker
    # the step's own thread and the timer that announces its start may do so at once.
    import subprocess
    import sys
    import threading

    from tests.conftest import ROOT, process_env

    numbers: list[int] = []
    other_process = subprocess.Popen(
        [sys.executable, "-c", "from agent import identity\nfor _ in range(300): print(identity.next_seq('gw-seq'))"],
        cwd=ROOT, env=process_env("redis://127.0.0.1:1/0", TGP_NODE_STATE_DIR=str(state_dir)),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip

    def count() -> None:
        for _ in range(100):
            numbers.append(identity.next_seq("gw-seq"))

    threads = [threading.Thread(target=count) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out, _ = other_process.communicate(timeout=60)
    numbers += [int(line) for line in out.split()]
    assert sorted(numbers) == list(range(1, 701))
