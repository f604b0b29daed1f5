"""Flower: refuses to start without credentials, answers 401 without them, and
lists the workflow's tasks under their names with them. Real Flower process."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.conftest import ROOT, process_env, stop_process, wait_for
from tests.servers import free_port
from tgpadmin.processes import die_with_parent

pytestmark = [pytest.mark.workflow, pytest.mark.timeout(120)]


def test_flower_refuses_to_start_without_credentials(redis_url):
    env = process_env(redis_url)
    env.pop("FLOWER_BASIC_AUTH", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tgpadmin.flower"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "Flower needs credentials" in proc.stderr


@pytest.fixture
def flower(redis_url, logs_dir):
    port = free_port()
    env = process_env(redis_url, FLOWER_BASIC_AUTH="watcher:correct-horse", TGP_FLOWER_PORT=str(port))
    with open(logs_dir / "flower.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tgpadmin.flower"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url, timeout=1).status_code == 401
            except httpx.TransportError:
                return False

        wait_for(up, 60, "Flower to answer")
        yield url
        stop_process(proc)
    assert "correct-horse" not in (logs_dir / "flower.log").read_text(), "the password reached the log"


@pytest.mark.django_db(transaction=True)
def test_flower_answers_401_without_credentials_and_lists_tasks_with_them(flower, control_worker):
    from tgpadmin.celery import app

    assert httpx.get(f"{flower}/", timeout=5).status_code == 401
    assert httpx.get(f"{flower}/api/tasks", timeout=5).status_code == 401
    assert httpx.get(f"{flower}/", auth=("watcher", "wrong-password"), timeout=5).status_code == 401

    # Flower learns about tasks from worker events; it must be listening before the task runs.
    auth = ("watcher", "correct-horse")
    wait_for(lambda: httpx.get(f"{flower}/api/workers", auth=auth, timeout=5).json(), 60, "Flower to see the worker")

    def listed() -> bool:
        tasks = httpx.get(f"{flower}/api/tasks", auth=auth, timeout=5).json()
        if any(t.get("name") == "control.reap_stale_runs" and t.get("state") == "SUCCESS" for t in tasks.values()):
            return True
        # Events sent before Flower's receiver was attached are lost: send again until one is seen.
        app.send_task("control.reap_stale_runs", queue="control")
        return False

    wait_for(listed, 60, "Flower to list control.reap_stale_runs as succeeded", interval=0.5)
