"""Fault injection with real processes: whatever is killed, a run ends as
docs/architecture.md promises (a killed agent or control worker costs no run: it
resumes and succeeds), none stays running, and a cluster slot is held exactly
while its node is out of service."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import timedelta

import psutil
import pytest
from django.db.models import F
from django.utils import timezone

from nodes.models import Cluster, Node
from tests.conftest import ROOT, Repo, process_env, stop_process, test_database_url, wait_for
from tests.servers import RepoServer
from updates.models import Release, UpdateLock, UpdateRun, UpdateSchedule, UpdateStep
from updates.runs import cluster_cap, start

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workflow, pytest.mark.timeout(240)]


def worker_of(agent: subprocess.Popen) -> psutil.Process:
    return wait_for(lambda: psutil.Process(agent.pid).children(), 30, "the agent's worker")[0]


# docs/architecture.md, "Safe to run twice": when the agent dies mid-step, "the next
# heartbeat carries a new agent instance id and node_reported queues the run again
# from the step its agent was in". So a killed agent costs no run: it ends
# succeeded, on 2.2.0, back in service, its slot free. The simulated appliance takes
# its time in drain, install and reboot (TGP_SIM_STEP_SECONDS) and the download is
# throttled, so the kill lands while these run, and the run resumes at that very step.
# notify and resume take it milliseconds and slot is the control plane's own step:
# there the kill lands just after the step, in the next node step if there is one,
# and the run goes on all the same.
KILLED_WHILE_RUNNING = {"drain", "download", "install", "reboot"}


def assert_resumed_and_succeeded(run: UpdateRun, cluster: Cluster, agent_before: str, state_dir) -> None:
    run.refresh_from_db()
    assert run.state == "succeeded", f"run {run.pk} is {run.state}: {run.error}"
    assert not UpdateStep.objects.filter(run=run).exclude(state="succeeded").exists()
    # The restarted agent reports itself at once, its new worker once it consumes (which
    # can come after the run ended, when the kill landed after its last node step).
    rows = Node.objects.filter(pk=run.node_id)
    wait_for(
        lambda: rows.exclude(agent_instance=agent_before).filter(worker_instance=F("agent_instance")),
        30,
        "the restarted agent and its worker",
    )
    node = rows.get()
    assert node.installed_version == "2.2.0" and not node.maintenance_mode
    appliance = json.loads((state_dir / node.hostname / "state.json").read_text())
    assert appliance["installed_version"] == "2.2.0" and appliance["maintenance"] is False
    assert not UpdateLock.objects.filter(node=node).exists()
    assert node.hostname not in {h.node for h in cluster_cap.cluster_slots().holders(cluster.name)}


@pytest.mark.parametrize("step", ["notify", "slot", "drain", "download", "install", "reboot", "resume"])
def test_agent_killed_in_a_step_the_run_resumes_and_succeeds(
    step, tmp_path, make_node, start_agent, control_worker, beat, state_dir
):
    # beat runs the reconciler, as in production: a hand-off lost with the killed
    # worker (its next message not yet published) is carried on from there.
    repo = Repo(tmp_path / "repo", package_bytes=256 * 1024)
    repo.import_releases()
    cluster = Cluster.objects.create(name=f"kill-{step}", max_parallel_updates=1)
    node = make_node("k", cluster=cluster)
    with RepoServer(repo.dir, rate=300 * 1024) as server:
        agent = start_agent(node.hostname, repo_url=server.url, root=repo.root_file, TGP_SIM_STEP_SECONDS="0.6-1.0")
        wait_for(lambda: Node.objects.get(pk=node.pk).agent_instance, 60, "the agent")
        run = start.start_update(Node.objects.get(pk=node.pk), Release.objects.get(version="2.2.0"))
        row = UpdateStep.objects.filter(run=run, name=step)
        reached = ("running",) if step in KILLED_WHILE_RUNNING else ("running", "succeeded")
        wait_for(lambda: row.get().state in reached, 60, f"step {step}")
        agent_before = Node.objects.get(pk=node.pk).agent_instance
        worker_of(agent).send_signal(signal.SIGKILL)
        wait_for(lambda: UpdateRun.objects.get(pk=run.pk).state != "running", 120, "the run to end")
    assert_resumed_and_succeeded(run, cluster, agent_before, state_dir)
    if step in KILLED_WHILE_RUNNING:
        resumed = f"agent of {node.hostname} restarted during run {run.pk}: resuming at {step}"
        assert resumed in control_worker.log_path.read_text(), "queued again from the step it was killed in"
        assert row.get().attempts >= 2, "and that step ran again"


def test_control_worker_killed_mid_run_the_run_still_ends(demo_repo, make_node, agent_for, control_worker, beat):
    repo, _ = demo_repo
    repo.import_releases()
    node = make_node("gw")
    agent_for(node, TGP_SIM_STEP_SECONDS="1.0-1.5")
    run = start.start_update(Node.objects.get(pk=node.pk), Release.objects.get(version="2.2.0"))
    wait_for(lambda: UpdateStep.objects.get(run=run, name="install").state == "running", 60, "the install")
    control_worker.kill()  # reports and the chain's control steps in its hands are lost
    control_worker.start()
    wait_for(lambda: UpdateRun.objects.get(pk=run.pk).state != "running", 120, "the run to end")
    run.refresh_from_db()
    assert run.state == "succeeded", run.error
    assert not UpdateStep.objects.filter(run=run, state="running").exists()


def test_two_beats_start_one_run_per_node(demo_repo, make_node, agent_for, beat, redis_url, logs_dir):
    repo, _ = demo_repo
    repo.import_releases()
    nodes = [make_node("gw") for _ in range(2)]
    for node in nodes:
        agent_for(node)
    second = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tgpadmin", "beat", "--max-interval", "1", "--pidfile=",
         "-s", str(logs_dir / "beat2-schedule")],
        cwd=ROOT, env=process_env(redis_url, DATABASE_URL=test_database_url()),
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    # Both schedules due at one instant: each beat sends both entries of each kind, and
    # the first task to run starts both nodes' runs (updates/scheduled.py: claim).
    run_at = timezone.now().replace(microsecond=0) + timedelta(seconds=9)
    try:
        schedules = [
            UpdateSchedule.objects.create(
                name=f"twice {node}", node=node, run_at=run_at, download_lead=timedelta(seconds=4)
            )
            for node in nodes
        ]
        runs = UpdateRun.objects.filter(node__in=nodes)
        wait_for(lambda: runs.count() == 2 and not runs.filter(state="running").exists(), 120, "both runs to end")
    finally:
        stop_process(second)
    assert sorted(runs.values_list("node_id", flat=True)) == sorted(n.pk for n in nodes)
    assert set(runs.values_list("state", flat=True)) == {"succeeded"}
    for schedule in schedules:
        schedule.refresh_from_db()
        run = runs.get(node=schedule.node_id)
        assert schedule.last_result.endswith(f"{schedule.node}: run {run.pk}"), "the update entry carried it on"
