"""The multi-host deployment (README "Deployment"): web, control worker, beat and a node's
agent each on a host of its own, Redis, PostgreSQL and the repository on another.

The hosts are network namespaces on one network (bench/netns.py's lan(): a bridge, an
address each); this machine is the infrastructure host at the network's gateway
address: the test's own Redis (with a password, listening there), PostgreSQL through
a forwarder (the machine's listens on loopback only), and the repository over HTTP.
An operator, on this machine, logs on to the web host over HTTP and announces an
update of a single system for a few seconds ahead; the web host tells the node's
users now, beat on its host starts the update at that time, the control worker on
its host runs it, and the agent on the node's host installs.

On SQLite the database is a file, not a host: the processes share it through the file
system, and only Redis, the web and the repository cross the network. Needs root and
iproute2; CI runs as root.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from django.db import connection
from django.utils import timezone

from bench import netns
from nodes.models import Node
from tests.conftest import ROOT, Repo, process_env, test_database_url, wait_for
from tests.servers import RepoServer, free_port
from tgpadmin import embedded_redis
from tgpadmin.processes import die_with_parent, stop_process
from updates.models import MaintenanceNotice, UpdateRun

pytestmark = [
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 (ip netns)"),
    pytest.mark.django_db(transaction=True),
    pytest.mark.workflow,
    pytest.mark.timeout(240),
]
HOSTS = ["web", "control", "beat", "node"]
REDIS_PASSWORD = "multi-host-tests-only-" + "r" * 20
WEB_PORT = 8000
PASSWORD = "pw-for-tests-only"  # the staff fixture's


class Deployment:
    """The processes of each host, each started on its host, stopped in reverse order."""

    def __init__(self, hosts: dict[str, netns.Host], logs: Path, stack: ExitStack) -> None:
        self.hosts, self.logs, self.stack = hosts, logs, stack
        self.procs: dict[str, subprocess.Popen[Any]] = {}  # by process name
        self.where: dict[str, str] = {}  # process name -> host

    def start(self, host: str, cmd: list[str], env: dict[str, str], name: str = "") -> subprocess.Popen[Any]:
        name = name or host
        log = self.stack.enter_context(open(self.logs / f"{name}.log", "a"))
        proc = subprocess.Popen(
            [*self.hosts[host].prefix, *cmd], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        self.stack.callback(stop_process, proc)
        self.procs[name], self.where[name] = proc, host
        return proc

    def log(self, host: str) -> str:
        return (self.logs / f"{host}.log").read_text()


def lan_redis(work: Path, stack: ExitStack) -> str:
    """A Redis of the test's own on the infrastructure host, as a deployment's: reached
    over the network with a password (which also keeps protected mode content)."""
    port = free_port()
    cmd = [*embedded_redis.command(port, work, persist=False, also=netns.GATEWAY), "--requirepass", REDIS_PASSWORD]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
    stack.callback(stop_process, proc)
    embedded_redis.wait_until_up(port)
    return f"redis://:{REDIS_PASSWORD}@{netns.GATEWAY}:{port}/0"


def lan_database(stack: ExitStack) -> str:
    """The test database as the other hosts reach it: PostgreSQL through a forwarder on
    the gateway address; SQLite as the file it is."""
    url = test_database_url()
    if url.startswith("sqlite"):
        return url
    forwarder = netns.Forwarder(int(connection.settings_dict["PORT"] or 5432), netns.GATEWAY)
    stack.callback(forwarder.stop)
    parts = urlsplit(url)
    netloc = f"{parts.netloc.rsplit('@', 1)[0]}@{netns.GATEWAY}:{forwarder.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def csrf_token(page: httpx.Response) -> str:
    found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert found, f"no CSRF token on {page.url} ({page.status_code})"
    return found.group(1)


def log_on(client: httpx.Client, username: str) -> None:
    token = csrf_token(client.get("/admin/login/"))
    answer = client.post(
        "/admin/login/",
        data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": token, "next": "/admin/"},
    )
    assert answer.status_code == 302 and answer.headers["location"] == "/admin/", answer.text[:500]


@pytest.fixture
def lan() -> Iterator[dict[str, netns.Host]]:
    with netns.lan("tgplan", HOSTS) as hosts:
        yield hosts


def test_web_control_worker_beat_and_a_node_on_hosts_of_their_own_update_the_node_at_the_announced_time(
    lan, tmp_path, make_node, staff, state_dir
):
    repo = Repo(tmp_path / "repo", package_bytes=64 * 1024)
    repo.import_releases()
    node = make_node("lan", users=("alice",))
    operator = staff("op", "update")
    with ExitStack() as stack:
        redis_url, db_url = lan_redis(tmp_path / "redis", stack), lan_database(stack)
        server = stack.enter_context(RepoServer(repo.dir, address=netns.GATEWAY))
        logs = tmp_path / "logs"
        logs.mkdir()
        hosts = Deployment(lan, logs, stack)
        control_env = process_env(
            redis_url, DATABASE_URL=db_url, TGP_REPO_URL=server.url, TGP_REPO_ROOT_FILE=str(repo.root_file)
        )
        celery = [sys.executable, "-m", "celery", "-A", "tgpadmin"]
        hosts.start("control", [*celery, "worker", "-Q", "control", "-n", "control@control", "-c", "2", "-E",
                                "--without-gossip", "--without-mingle", "-l", "INFO"], control_env)  # fmt: skip
        hosts.start("control", [sys.executable, "manage.py", "heartbeats"], control_env, name="heartbeats")
        hosts.start("beat", [*celery, "beat", "-l", "INFO", "--max-interval", "1", "--pidfile=",
                             "-s", str(tmp_path / "beat-schedule")], control_env)  # fmt: skip
        web = lan["web"].address
        web_env = {**control_env, "DJANGO_ALLOWED_HOSTS": web}
        hosts.start("web", [sys.executable, "manage.py", "runserver", f"{web}:{WEB_PORT}", "--noreload"], web_env)
        hosts.start("node", [sys.executable, "-m", "agent", node.hostname], process_env(
            redis_url, DATABASE_URL="postgres://nobody@127.0.0.1:1/no-database-for-agents",
            DJANGO_SETTINGS_MODULE="no.such.settings", TGP_NODE_STATE_DIR=str(state_dir),
            TGP_REPO_URL=server.url, TGP_REPO_ROOT_FILE=str(repo.root_file),
        ))  # fmt: skip
        for name, proc in hosts.procs.items():  # each on its host, not on this one
            where = subprocess.run(["ip", "netns", "identify", str(proc.pid)], capture_output=True, text=True)
            assert where.stdout.strip() == lan[hosts.where[name]].name, f"{name}: {where.stdout!r} {where.stderr!r}"
        wait_for(lambda: "control@control ready." in hosts.log("control"), 60, "the control worker on its host")
        wait_for(lambda: Node.objects.get(pk=node.pk).agent_instance, 60, "the node's first report, across hosts")

        client = stack.enter_context(httpx.Client(base_url=f"http://{web}:{WEB_PORT}", trust_env=False, timeout=10))
        wait_for(lambda: _answers(client), 60, "the web host")
        log_on(client, operator.username)
        page = client.get(f"/admin/nodes/node/autoupdate/?ids={node.pk}")
        assert page.status_code == 200 and node.hostname in page.text
        update_at = (timezone.now() + timedelta(seconds=8)).replace(microsecond=0)
        answer = client.post("/admin/nodes/node/autoupdate/", data={
            "ids": node.pk, "confirm": "yes", "when": "at", "csrfmiddlewaretoken": csrf_token(page),
            "update_at": timezone.localtime(update_at).strftime("%Y-%m-%d %H:%M:%S"),
        })  # fmt: skip
        assert answer.status_code == 302, answer.text[:500]
        notice = MaintenanceNotice.objects.get(node=node)
        assert notice.state == "pending" and notice.starts_at == update_at and notice.release.version == "2.2.0"

        run = wait_for(lambda: UpdateRun.objects.filter(node=node).first(), 60, "beat to start the update at its time")
        assert run.created_at >= update_at and run.started_by == operator
        run = wait_for(
            lambda: UpdateRun.objects.exclude(state=UpdateRun.State.RUNNING).filter(pk=run.pk).first(), 120, "the run"
        )
        assert run.state == "succeeded", run.error
    node.refresh_from_db()
    assert node.installed_version == "2.2.0" and not node.maintenance_mode
    assert set(run.steps.values_list("state", flat=True)) == {"succeeded"}
    control_log = hosts.log("control")
    # The control worker on its host took the web host's and beat's work from Redis.
    assert "control.start_announced_updates" in control_log and "control.verify" in control_log


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/admin/login/").status_code == 200
    except httpx.TransportError:
        return False
