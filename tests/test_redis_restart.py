"""Redis killed and started again in the middle of a rollout (append-only file on,
as the embedded Redis runs in production): no node installs twice, no run is lost.

A private Redis for this test only: the session's (or CI's) Redis is not ours to kill."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from nodes.models import Cluster, Node
from tests.conftest import ROOT, ControlWorker, Repo, process_env, stop_process, test_database_url, wait_for
from tests.servers import RepoServer, free_port
from tgpadmin import embedded_redis
from tgpadmin.processes import die_with_parent, stop_processes
from updates.models import UpdateLock, UpdateRun, UpdateStep

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workflow, pytest.mark.timeout(300)]


class PrivateRedis:
    def __init__(self, data_dir) -> None:
        self.port, self.data_dir = free_port(), data_dir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = embedded_redis.command(self.port, self.data_dir, persist=True) + ["--appendfsync", "always"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        embedded_redis.wait_until_up(self.port)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def installs(state_dir, node) -> dict:
    return json.loads((state_dir / node.hostname / "state.json").read_text())["installs"]


def test_redis_restarted_during_a_rollout_no_node_installs_twice_no_run_is_lost(
    tmp_path, make_node, start_agent, state_dir, logs_dir
):
    redis = PrivateRedis(tmp_path / "redis")
    redis.start()
    agents: list[subprocess.Popen] = []
    repo = Repo(tmp_path / "repo", package_bytes=256 * 1024)
    repo.import_releases()
    cluster = Cluster.objects.create(name="restart", max_parallel_updates=2)
    nodes = [make_node("r", cluster=cluster) for _ in range(4)]
    control = ControlWorker(redis.url, test_database_url(), logs_dir / "control-restart.log")
    env = process_env(redis.url, DATABASE_URL=test_database_url())
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tgpadmin", "beat", "--max-interval", "1", "--pidfile=",
         "-s", str(tmp_path / "beat-schedule")],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=die_with_parent,
    )  # fmt: skip
    try:
        control.start()
        with RepoServer(repo.dir, rate=400 * 1024) as server:
            agents += [
                start_agent(node.hostname, repo_url=server.url, root=repo.root_file, REDIS_URL=redis.url,
                            TGP_SIM_STEP_SECONDS="0.3-0.6")
                for node in nodes
            ]  # fmt: skip
            for node in nodes:
                wait_for(lambda n=node: Node.objects.get(pk=n.pk).agent_instance, 60, f"the agent of {node}")
                subprocess.run(
                    [sys.executable, "manage.py", "autoupdate", node.hostname, "--yes"], cwd=ROOT, env=env,
                    check=True, capture_output=True, timeout=60,
                )  # fmt: skip
            downloading = UpdateStep.objects.filter(run__node__in=nodes, name="download", state="running")
            wait_for(downloading.exists, 60, "a download under way")
            redis.kill()
            redis.start()
            runs = UpdateRun.objects.filter(node__in=nodes)
            wait_for(lambda: not runs.filter(state="running").exists(), 180, "every run to end")
    finally:
        # Agents and workers first, while their Redis still answers: stopped after it,
        # each agent's worker would try to reconnect until stop_process kills it (15 s each).
        stop_processes(agents)
        stop_process(beat)
        control.stop()
        if redis.proc:
            stop_process(redis.proc)

    assert runs.count() == len(nodes), "no run is lost"
    for run in runs:
        node = run.node
        if run.state == "succeeded":
            assert list(installs(state_dir, node)) == [str(run.pk)], f"{node} installed once"
        else:
            assert UpdateLock.objects.filter(node=node, removed_at=None).exists(), f"{node} failed without a lock"
            assert len(installs(state_dir, node)) <= 1
    assert runs.filter(state="succeeded").exists()
