"""Flower: refuses to start without credentials, answers 401 without them (/metrics
too), lists the workflow's tasks under their names with them, and refuses every
write (sending, revoking, aborting, limits, worker control) with them; does not
start when it cannot be made read-only. Real Flower process, real Redis, the
session's real control worker."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import httpx
import pytest

from tests.conftest import ROOT, process_env, stop_process, wait_for
from tests.servers import free_port
from tgpadmin.processes import die_with_parent

pytestmark = [pytest.mark.workflow, pytest.mark.timeout(120)]

AUTH = ("watcher", "correct-horse")
READ_ONLY = "Flower is read-only in tgpadmin"


def test_flower_refuses_to_start_without_credentials(redis_url):
    env = process_env(redis_url)
    env.pop("FLOWER_BASIC_AUTH", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tgpadmin.flower"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "Flower needs credentials" in proc.stderr


# Run python -m tgpadmin.flower with a change to Flower made first in the same process.
_CHANGED_FLOWER = """
import sys
import tgpadmin.flower as f
{change}
sys.exit(f.main([]))
"""


@pytest.mark.parametrize(
    "change, reason",
    [
        ("import flower; flower.__version__ = '2.3.0'", "Flower 2.3.0 installed, the gate is for 2.2.0"),
        (
            # A route the gate did not see (as if Flower added one where tgpadmin does not look).
            "install = f.install\n"
            "def f_install():\n"
            "    install()\n"
            "    from flower import urls, views\n"
            "    urls.handlers.insert(0, (r'/api/new-write', views.BaseHandler))\n"
            "f.install = f_install",
            "routes without the read-only gate",
        ),
    ],
    ids=["other-version", "ungated-route"],
)
def test_flower_does_not_start_when_it_cannot_be_made_read_only(redis_url, change, reason):
    env = process_env(redis_url, FLOWER_BASIC_AUTH="watcher:correct-horse", TGP_FLOWER_PORT=str(free_port()))
    script = _CHANGED_FLOWER.format(change=change)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Flower not started, it could not be made read-only" in proc.stderr and reason in proc.stderr


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
    auth = AUTH
    wait_for(lambda: httpx.get(f"{flower}/api/workers", auth=auth, timeout=5).json(), 60, "Flower to see the worker")

    def listed() -> bool:
        tasks = httpx.get(f"{flower}/api/tasks", auth=auth, timeout=5).json()
        if any(t.get("name") == "control.reap_stale_runs" and t.get("state") == "SUCCESS" for t in tasks.values()):
            return True
        # Events sent before Flower's receiver was attached are lost: send again until one is seen.
        app.send_task("control.reap_stale_runs", queue="control")
        return False

    wait_for(listed, 60, "Flower to list control.reap_stale_runs as succeeded", interval=0.5)


def _flower_sees(flower: str, worker: str) -> None:
    """Flower's worker control endpoints answer 404 for a worker it has not inspected yet."""
    wait_for(
        lambda: worker in httpx.get(f"{flower}/api/workers", auth=AUTH, timeout=5).json(),
        60,
        f"Flower to see {worker}",
        interval=0.5,
    )


@pytest.mark.django_db(transaction=True)
def test_flower_reads_work_with_credentials(flower, control_worker):
    """The pages and the read API answer 200, including the task table, which the
    tasks page loads with a POST; the UI offers no write buttons."""
    from tgpadmin.celery import app

    worker = control_worker.name
    _flower_sees(flower, worker)

    def a_task_id() -> str | None:
        tasks = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json()
        if tasks:
            return next(iter(tasks))
        app.send_task("control.reap_stale_runs", queue="control")
        return None

    task_id = wait_for(a_task_id, 60, "Flower to list a task", interval=0.5)
    for path in [
        "/", "/workers", "/tasks", "/broker", f"/worker/{worker}", f"/task/{task_id}", "/api/workers",
        "/api/tasks", "/api/task/types", "/api/queues/length", f"/api/task/info/{task_id}", "/healthcheck",
    ]:  # fmt: skip
        assert httpx.get(f"{flower}{path}", auth=AUTH, timeout=10).status_code == 200, path
    table = httpx.post(
        f"{flower}/tasks/datatable",
        data={"draw": 1, "start": 0, "length": 10, "order[0][column]": 0, "order[0][dir]": "asc"},
        auth=AUTH,
        timeout=10,
    )
    assert table.status_code == 200 and table.json()["recordsTotal"] >= 1, table.text
    # Flower's own read-only switch is on as well: its worker page offers no actions.
    page = httpx.get(f"{flower}/worker/{worker}", auth=AUTH, timeout=10).text
    assert 'id="worker-shutdown"' not in page and 'id="worker-pool-grow"' not in page


@pytest.mark.django_db(transaction=True)
def test_flower_refuses_every_write_with_valid_credentials(flower, control_worker, redis_url):
    """Each write family answers 403 with the read-only message and changes nothing:
    no task is queued, revoked or aborted, no limit changes, the worker keeps its pool,
    its queues and its life. All requests first, then all checks, so that a Flower
    that lets writes through shows every effect at once."""
    import redis

    from tgpadmin.celery import app

    worker = control_worker.name
    _flower_sees(flower, worker)
    broker = redis.Redis.from_url(redis_url)
    inspect = app.control.inspect(destination=[worker], timeout=5)

    def worker_state() -> dict[str, object] | None:
        """What the writes would change: pool size, queues, task limits (None: no answer). Not the
        prefetch count, which ETA tasks of the session move."""
        stats, queues = inspect.stats() or {}, inspect.active_queues() or {}
        limits = inspect.registered("rate_limit", "time_limit", "soft_time_limit") or {}
        if worker not in stats or worker not in queues or worker not in limits:
            return None
        return {
            "processes": len(stats[worker]["pool"]["processes"]),
            "queues": sorted(q["name"] for q in queues[worker]),
            "task_limits": sorted(limits[worker]),
        }

    before = worker_state()
    assert before and before["queues"] == ["control"], before
    probe = f"flower-probe-{uuid.uuid4().hex[:6]}"  # a queue no worker consumes: whatever is sent stays there
    task_id = str(uuid.uuid4())
    task = "control.reap_stale_runs"
    writes = [
        # The worker is shut down first: the longer it lives afterwards, the better the proof.
        ("POST", f"/api/worker/shutdown/{worker}", {}),
        ("POST", f"/api/task/async-apply/{task}", {"json": {"queue": probe}}),
        ("POST", f"/api/task/send-task/{task}", {"json": {"queue": probe}}),
        ("POST", f"/api/task/apply/{task}", {"json": {"queue": probe, "timeout": 1}}),
        ("POST", f"/api/task/revoke/{task_id}?terminate=true", {}),
        ("POST", f"/api/task/abort/{task_id}", {}),
        ("POST", f"/api/task/rate-limit/{task}", {"data": {"ratelimit": "1/h", "workername": worker}}),
        ("POST", f"/api/task/timeout/{task}", {"data": {"soft": "30", "hard": "100", "workername": worker}}),
        ("POST", f"/api/worker/pool/grow/{worker}?n=2", {}),
        ("POST", f"/api/worker/pool/shrink/{worker}?n=1", {}),
        ("POST", f"/api/worker/pool/autoscale/{worker}?min=1&max=4", {}),
        ("POST", f"/api/worker/pool/restart/{worker}", {}),
        ("POST", f"/api/worker/queue/add-consumer/{worker}?queue={probe}", {}),
        ("POST", f"/api/worker/queue/cancel-consumer/{worker}?queue=control", {}),
        # Refused by method, not by a list of Flower's endpoints: a write Flower does not
        # have (yet) and other methods on a read endpoint get the same answer.
        ("POST", "/api/no-such-endpoint", {}),
        ("DELETE", "/api/tasks", {}),
        ("PUT", f"/api/worker/shutdown/{worker}", {}),
        ("PATCH", "/api/workers", {}),
    ]
    problems = []
    sent = time.monotonic()
    for method, path, kwargs in writes:
        if (status := httpx.request(method, f"{flower}{path}", timeout=10, **kwargs).status_code) != 401:
            problems.append(f"{method} {path} without credentials: {status}, not 401")
        answer = httpx.request(method, f"{flower}{path}", auth=AUTH, timeout=10, **kwargs)
        if (answer.status_code, answer.text) != (403, READ_ONLY):
            problems.append(f"{method} {path}: {answer.status_code} {answer.text[:200]!r}")

    if queued := broker.llen(probe):
        problems.append(f"{queued} task message(s) queued on {probe}")
    if task_id in (inspect.revoked() or {}).get(worker, []):
        problems.append("the task was revoked")
    if (state := app.AsyncResult(task_id).state) != "PENDING":
        problems.append(f"the task's state is {state} (aborted?)")
    # A prefork pool grows at its next maintenance (every 5 s): look after that.
    time.sleep(max(0.0, sent + 7 - time.monotonic()))
    if (after := worker_state()) != before:
        problems.append(f"the worker changed: {before} -> {after}")
    if not app.control.ping(destination=[worker], timeout=5):
        problems.append("the worker does not answer ping (shut down?)")
    assert not problems, "\n".join(problems)


def test_flower_metrics_need_credentials_and_healthcheck_says_only_ok(flower):
    """Flower 2.2 serves /metrics and /healthcheck without asking for credentials;
    tgpadmin asks for them on /metrics and leaves the health check open."""
    assert httpx.get(f"{flower}/metrics", timeout=5).status_code == 401
    assert httpx.get(f"{flower}/metrics", auth=("watcher", "wrong-password"), timeout=5).status_code == 401
    assert httpx.get(f"{flower}/metrics", auth=("nobody", "correct-horse"), timeout=5).status_code == 401
    metrics = httpx.get(f"{flower}/metrics", auth=AUTH, timeout=5)
    assert metrics.status_code == 200 and "flower_" in metrics.text
    health = httpx.get(f"{flower}/healthcheck", timeout=5)
    assert (health.status_code, health.text) == (200, "OK")


@pytest.mark.django_db(transaction=True)
def test_heartbeats_do_not_crowd_out_the_tasks_flower_lists(flower, control_worker):
    """At 10,000 nodes heartbeats would be most of Flower's events and push every other
    task out of its list (control.node_report sends none; issue 16)."""
    from agent.app import app as agent_app
    from agent.shared.protocol import NODE_REPORT, REPORT_PRIORITY
    from tgpadmin.celery import app

    wait_for(lambda: httpx.get(f"{flower}/api/workers", auth=AUTH, timeout=5).json(), 60, "Flower to see the worker")
    marker = f"after-heartbeats-{uuid.uuid4().hex[:6]}"

    def listed() -> bool:
        # A heartbeat as an agent sends it (its app sends no "task-sent" event), refused by
        # the control plane (signed by nobody) but a task all the same; then a task that
        # Flower lists, behind it in the same queue at the same priority.
        agent_app.send_task(
            NODE_REPORT, args=({"body": {}, "signature": ""},), queue="control", priority=REPORT_PRIORITY
        )
        app.send_task("control.reap_stale_runs", queue="control", priority=REPORT_PRIORITY, argsrepr=marker)
        tasks = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json().values()
        return sum(t.get("args") == marker and t.get("state") == "SUCCESS" for t in tasks) >= 2

    wait_for(listed, 60, "Flower to list the tasks sent after heartbeats", interval=0.5)
    tasks = httpx.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json().values()
    assert not [t for t in tasks if t.get("name") == NODE_REPORT]
