"""Redis with Sentinel (agent/shared/sentinel.py, README "Deployment").

The failover test runs a primary and a replica (Redis 7, each with tgpadmin's broker
users: ACL is not replicated, so ``manage.py broker_acl --apply`` puts them on every
server the Sentinels know) and three Sentinels, with the default user off everywhere
and the processes asking the Sentinels as a user that may only ask. A control worker,
beat and four cluster agents, every process on its own broker user and a sentinel://
URL, roll out an update; the primary is killed while nodes hold their update slots.
The Sentinels promote the replica, everyone finds it, and every run completes with
each node's install carried out once.

The small tests: what a sentinel:// configuration makes of the control side's settings
and the agent's configuration, and what an inconsistent one is refused or warned with.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.core.exceptions import ImproperlyConfigured

from agent.shared.env import ConfigError
from agent.shared.sentinel import Sentinel, parse_sentinel_url, redis_client
from tests.conftest import ROOT, ControlWorker, Repo, process_env, test_database_url, wait_for
from tests.servers import RepoServer, free_port
from tests.test_broker_acl import REDIS7, RedisServer, needs_redis7
from tests.test_cap_property import most_at_once
from tests.test_redis_restart import installs
from tgpadmin import broker_acl as acl
from tgpadmin import embedded_redis
from tgpadmin.processes import die_with_parent, stop_process

MASTER = "tgp"
# What a client of the Sentinels needs (redis-py's discover_master asks SENTINEL MASTERS,
# broker_acl's replica list SENTINEL REPLICAS), and nothing that changes them: the README's
# rules for the Sentinels' user "tgp-client".
CLIENT_RULES = (
    "-@all +auth +ping +sentinel|masters +sentinel|master +sentinel|replicas +sentinel|slaves "
    "+sentinel|sentinels +sentinel|get-master-addr-by-name"
)


def _hash(password: str) -> str:
    return "#" + hashlib.sha256(password.encode()).hexdigest()


class SentinelRedis:
    """A primary, a replica and three Sentinels on free loopback ports, in `work`.

    The Redis servers start with only tgpadmin's admin user (default user off): the
    replica replicates and the Sentinels watch as admin. The Sentinels' own users: `peer`
    (the Sentinels among themselves) and `tgp-client` (the processes: CLIENT_RULES)."""

    def __init__(self, work: Path) -> None:
        assert REDIS7 is not None
        self.binary: str = REDIS7
        self.work = work
        self.broker_dir = work / "broker"
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.url_base = ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports) + "/0"
        self.creds = acl.Credentials(self.broker_dir, self.url_base)
        self.admin_password = self.creds.password(acl.ADMIN)
        self.creds.write(acl.ADMIN, self.admin_password)
        self.client_password, self.peer_password = "client-" + os.urandom(8).hex(), "peer-" + os.urandom(8).hex()
        self.client_password_file = acl.write_secret(work / "sentinel-client.password", self.client_password + "\n")
        admin_only = acl.acl_file({acl.ADMIN: acl.admin_user().rules(), acl.DEFAULT: []}, self.passwords)
        auth = ("--masteruser", acl.ADMIN, "--masterauth", self.admin_password)
        self.primary = self._server("primary", admin_only, *auth)
        self.replica = self._server("replica", admin_only, *auth, "--replicaof", "127.0.0.1", str(self.primary.port))
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def passwords(self) -> dict[str, str]:
        return {acl.ADMIN: self.admin_password}

    def _server(self, name: str, acl_file: bytes, *extra: str) -> RedisServer:
        data = self.work / name
        data.mkdir(parents=True)
        acl.write_secret(data / "users.acl", acl_file)
        return RedisServer(self.binary, data, "--aclfile", str(data / "users.acl"), *extra)

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        for port in self.sentinel_ports:
            directory = self.work / f"sentinel-{port}"
            directory.mkdir()
            conf = directory / "sentinel.conf"
            conf.write_text(
                textwrap.dedent(f"""\
                    port {port}
                    bind 127.0.0.1
                    dir {directory}
                    sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} 2
                    sentinel down-after-milliseconds {MASTER} 1000
                    sentinel failover-timeout {MASTER} 10000
                    sentinel auth-user {MASTER} {acl.ADMIN}
                    sentinel auth-pass {MASTER} {self.admin_password}
                    sentinel sentinel-user peer
                    sentinel sentinel-pass {self.peer_password}
                    user default off
                    user peer on {_hash(self.peer_password)} ~* &* +@all
                    user tgp-client on {_hash(self.client_password)} {CLIENT_RULES}
                    """)
            )
            conf.chmod(0o600)
            log = open(directory / "sentinel.log", "wb")
            self.sentinels.append(
                subprocess.Popen(
                    [self.binary, str(conf), "--sentinel"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )  # fmt: skip
            )
            embedded_redis.wait_until_up(port)
        # Ready when every Sentinel knows the replica and the two others (it learns of them
        # from their hellos, every 2 s): only then can they agree on a failover.
        wait_for(self._all_see_everyone, 30, "the Sentinels to see the replica and each other", interval=0.2)

    def _all_see_everyone(self) -> bool:
        for port in self.sentinel_ports:
            state: Any = self.sentinel(port).sentinel_master(MASTER)
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                return False
        return self.server(self.replica.port).info("replication")["master_link_status"] == "up"

    def sentinel(self, port: int, user: str = "peer") -> redis.Redis:
        password = self.peer_password if user == "peer" else self.client_password
        return redis.Redis(port=port, username=user, password=password, decode_responses=True, socket_timeout=5)

    def server(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, username=acl.ADMIN, password=self.admin_password, socket_timeout=5)

    def primary_port(self) -> int:
        address: Any = self.sentinel(self.sentinel_ports[0], "tgp-client").sentinel_get_master_addr_by_name(MASTER)
        return int(address[1])

    def env(self, user: str) -> dict[str, str]:
        """A process's broker configuration: its user's sentinel:// URL file, the master's
        name and the Sentinels' client user."""
        return {
            "REDIS_URL": "",
            "TGP_REDIS_URL_FILE": str(self.creds.path(user)),
            "TGP_REDIS_SENTINEL_MASTER": MASTER,
            "TGP_REDIS_SENTINEL_USER": "tgp-client",
            "TGP_REDIS_SENTINEL_PASSWORD_FILE": str(self.client_password_file),
        }

    def stop(self) -> None:
        for proc in self.sentinels:
            stop_process(proc)
        self.replica.stop()
        self.primary.stop()


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[SentinelRedis]:
    if REDIS7 is None:
        pytest.skip("no redis-server >= 7 (PATH or /usr/bin): the broker users need Redis 7")
    cluster = SentinelRedis(tmp_path / "sentinel")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# After the failover, in a process of the control side's own: the direct clients find
# the new primary too (the cluster slots, the result backend, Flower's queue lengths).
AFTER_FAILOVER = textwrap.dedent(
    """
    import asyncio, json
    import django
    django.setup()
    from django.conf import settings
    from flower.utils.broker import Broker
    from tgpadmin.celery import app
    from updates.runs.cluster_cap import cluster_slots

    broker = Broker(app.connection().as_uri(include_password=True),
                    broker_options=settings.CELERY_BROKER_TRANSPORT_OPTIONS)
    print(json.dumps({
        "holders": [h.node for h in cluster_slots().holders("failover")],
        "backend": type(app.backend).__name__,
        "backend_ping": app.backend.client.ping(),
        "queues": asyncio.run(broker.queues(["control"])),
    }))
    """
)


@needs_redis7
@pytest.mark.django_db(transaction=True)
@pytest.mark.workflow
@pytest.mark.timeout(240)
def test_the_primary_killed_during_a_rollout_every_run_completes_and_each_node_installs_once(
    sentinel_redis, tmp_path, make_node, start_agent, state_dir, logs_dir, monkeypatch
):
    from nodes.models import Cluster, Node
    from updates.models import UpdateRun, UpdateStep

    sr = sentinel_redis
    repo = Repo(tmp_path / "repo", package_bytes=256 * 1024)
    repo.import_releases()
    cluster = Cluster.objects.create(name="failover", max_parallel_updates=2)
    nodes = [make_node("sf", cluster=cluster) for _ in range(4)]
    db_url = test_database_url()

    # Every node's broker user on every server the Sentinels know, as an operator would
    # (the servers started with the admin user only).
    applied = subprocess.run(
        [sys.executable, "manage.py", "broker_acl", "--apply", "--out", str(sr.broker_dir)], cwd=ROOT,
        env=process_env("", DATABASE_URL=db_url, **sr.env(acl.ADMIN)), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr[-2000:]
    for port in (sr.primary.port, sr.replica.port):
        assert f"applied to redis://127.0.0.1:{port}/0" in applied.stdout, applied.stdout
        users = set(sr.server(port).acl_users())
        assert {f"node-{n.hostname}" for n in nodes} | {"control", "web", "flower"} <= users, port
    assert sr.creds.path("control").read_text().startswith("sentinel://control:")

    # The control worker (ControlWorker takes the environment of this process) and beat.
    for name, value in sr.env("control").items():
        monkeypatch.setenv(name, value)
    control = ControlWorker("", db_url, logs_dir / "control-sentinel.log")
    control_env = process_env("", DATABASE_URL=db_url, **sr.env("control"))
    beat_log = open(logs_dir / "beat-sentinel.log", "ab")
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tgpadmin", "beat", "--max-interval", "1", "--pidfile=",
         "-s", str(tmp_path / "beat-schedule")],
        cwd=ROOT, env=control_env, stdout=beat_log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=die_with_parent,
    )  # fmt: skip
    runs = UpdateRun.objects.filter(node__in=nodes)
    try:
        control.start()
        with RepoServer(repo.dir, rate=800 * 1024) as server:
            for node in nodes:
                start_agent(node.hostname, repo_url=server.url, root=repo.root_file, TGP_SIM_STEP_SECONDS="0.3-0.6",
                            **sr.env(f"node-{node.hostname}"))  # fmt: skip
            for node in nodes:
                wait_for(lambda n=node: Node.objects.get(pk=n.pk).agent_instance, 60, f"the agent of {node}")
            subprocess.run(
                [sys.executable, "manage.py", "autoupdate", "--cluster", cluster.name, "--yes"], cwd=ROOT,
                env=control_env, check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            # Mid-rollout: a node out of service holding its slot, the others waiting or downloading.
            drained = UpdateStep.objects.filter(run__node__in=nodes, name="drain", state="succeeded")
            wait_for(drained.exists, 60, "a node to hold its update slot")
            assert runs.filter(state="running").count() >= 2, "the primary goes down mid-rollout"
            sr.primary.proc.kill()  # type: ignore[union-attr]
            sr.primary.proc.wait(10)  # type: ignore[union-attr]
            wait_for(lambda: sr.primary_port() == sr.replica.port, 30, "the Sentinels to promote the replica")
            wait_for(lambda: not runs.filter(state="running").exists(), 120, "every run to end")
        after = subprocess.run(
            [sys.executable, "-c", AFTER_FAILOVER], cwd=ROOT, env=control_env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    finally:
        stop_process(beat)
        beat_log.close()
        control.stop()

    assert runs.count() == len(nodes), "no run is lost"
    for run in runs.select_related("node"):
        assert run.state == "succeeded", f"{run.node}: {run.state} {run.error}"
        assert list(installs(state_dir, run.node)) == [str(run.pk)], f"{run.node} installed once"
    # The slots moved with the primary: never more than the cap out of service at once.
    steps = {(s.run_id, s.name): s for s in UpdateStep.objects.filter(run__in=runs, name__in=("drain", "resume"))}
    spans = [(steps[run.pk, "drain"].started_at, steps[run.pk, "resume"].finished_at) for run in runs]
    assert most_at_once(spans) <= cluster.max_parallel_updates  # type: ignore[arg-type]
    assert after.returncode == 0, after.stderr[-3000:]
    found = json.loads(after.stdout.strip().splitlines()[-1])
    assert found["holders"] == [], "every slot was released, on the new primary"
    assert found["backend"] == "SentinelBackend" and found["backend_ping"] is True
    assert found["queues"][0]["name"] == "control"
    new_primary = sr.server(sr.replica.port)
    assert new_primary.info("replication")["role"] == "master"
    # Nobody was refused on the new primary (every user was there), and the processes
    # asked the Sentinels for nothing their client user may not.
    assert new_primary.acl_log() == []
    for port in sr.sentinel_ports:
        assert sr.sentinel(port).acl_log() == [], f"Sentinel {port} refused something"


# --- configuration ---------------------------------------------------------------------

SHOW_CONFIGURATION = textwrap.dedent(
    """
    import json
    import django
    django.setup()
    from django.conf import settings
    from django.core.checks import run_checks
    from tgpadmin.celery import app
    from agent.config import config
    from agent.app import app as agent_app

    with app.connection_for_write() as conn:
        transport, alternates = conn.transport_cls, conn.alt
    print(json.dumps({
        "broker_url": settings.CELERY_BROKER_URL,
        "result_backend": settings.CELERY_RESULT_BACKEND,
        "broker_options": settings.CELERY_BROKER_TRANSPORT_OPTIONS,
        "backend_options": settings.CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS,
        "backend": type(app.backend).__name__,
        "backend_hosts": [(h["host"], h["port"]) for h in app.backend.connparams["hosts"]],
        "backend_user": [app.backend.connparams["username"], app.backend.connparams["db"]],
        "transport": transport,
        "alternates": alternates,
        "checks": sorted(m.id for m in run_checks() if m.id in {"tgpadmin.W010", "tgpadmin.W011", "tgpadmin.W012"}),
        "agent_url": config().redis_url,
        "agent_sentinel": [config().redis_sentinel.master, config().redis_sentinel.username,
                           config().redis_sentinel.password],
        "agent_options": agent_app.conf.broker_transport_options,
        "agent_broker": agent_app.conf.broker_url,
    }))
    """
)


def _config_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in process_env("").items() if not k.startswith("TGP_REDIS")}
    return {**env, "TGP_VAR_DIR": str(tmp_path), **extra}


def test_a_sentinel_configuration_makes_the_broker_backend_and_agent_settings(tmp_path):
    password_file = acl.write_secret(tmp_path / "sentinel.password", "s3cret\n")
    url_file = acl.write_secret(
        tmp_path / "control.url",
        # As an administrator may write it: the user in the first entry, the database at the end.
        "sentinel://control:p%40ss@10.0.0.1:26379;sentinel://10.0.0.2;sentinel://10.0.0.3:26380/2\n",
    )
    env = _config_env(
        tmp_path,
        TGP_REDIS_URL_FILE=str(url_file),
        TGP_REDIS_SENTINEL_MASTER="tgp-main",
        TGP_REDIS_SENTINEL_USER="tgp-client",
        TGP_REDIS_SENTINEL_PASSWORD_FILE=str(password_file),
    )
    done = subprocess.run(
        [sys.executable, "-c", SHOW_CONFIGURATION], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shown = json.loads(done.stdout.strip().splitlines()[-1])
    entries = [
        "sentinel://control:p%40ss@10.0.0.1:26379/2",
        "sentinel://control:p%40ss@10.0.0.2:26379/2",
        "sentinel://control:p%40ss@10.0.0.3:26380/2",
    ]
    # User, password and database in every entry: kombu's fail-over to the next entry takes its own.
    assert shown["broker_url"] == shown["result_backend"] == shown["agent_url"] == ";".join(entries)
    assert shown["transport"] == "sentinel" and shown["alternates"] == entries
    options = {
        "master_name": "tgp-main",
        "sentinel_kwargs": {
            "socket_connect_timeout": 5.0,
            "socket_timeout": 5.0,
            "username": "tgp-client",
            "password": "s3cret",
        },
    }
    assert shown["broker_options"] == {"visibility_timeout": 3600, "ack_emulation": True, **options}
    assert shown["backend_options"] == options
    assert shown["backend"] == "SentinelBackend"
    assert shown["backend_hosts"] == [["10.0.0.1", 26379], ["10.0.0.2", 26379], ["10.0.0.3", 26380]]
    assert shown["backend_user"] == ["control", 2]
    assert shown["agent_sentinel"] == ["tgp-main", "tgp-client", "s3cret"]
    assert shown["agent_options"] == {"ack_emulation": False, **options}
    assert shown["agent_broker"] == ";".join(entries)
    assert shown["checks"] == [], "three Sentinels, asked with a password: nothing to warn about"


def test_an_inconsistent_sentinel_configuration_is_refused_or_warned_about(tmp_path, monkeypatch, settings):
    from agent.config import AgentConfig
    from agent.shared import env as shared_env
    from tgpadmin import env as control_env
    from updates.checks import check_broker

    for name in shared_env.SENTINEL_VARIABLES + ("TGP_REDIS_URL_FILE", "TGP_REDIS_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    sentinels = "sentinel://control:pw-in-url@127.0.0.1:26379;sentinel://127.0.0.1:26380/0"

    # Sentinels, but no name of the primary: both sides stop at start.
    monkeypatch.setenv("REDIS_URL", sentinels)
    with pytest.raises(ConfigError, match="set TGP_REDIS_SENTINEL_MASTER"):
        AgentConfig.from_env()
    with pytest.raises(ImproperlyConfigured, match="set TGP_REDIS_SENTINEL_MASTER"):
        control_env.env_redis_sentinel(control_env.env_redis_url("redis://unused"))
    stopped = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=_config_env(tmp_path, REDIS_URL=sentinels),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert stopped.returncode != 0 and "set TGP_REDIS_SENTINEL_MASTER" in stopped.stderr
    agent = subprocess.run(
        [sys.executable, "-m", "agent", "gw1"], cwd=ROOT, env=_config_env(tmp_path, REDIS_URL=sentinels),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert agent.returncode == 2 and "agent: configuration error" in agent.stderr
    assert "TGP_REDIS_SENTINEL_MASTER" in agent.stderr

    # URLs that cannot be meant, each refused with the reason and without the password.
    monkeypatch.setenv("TGP_REDIS_SENTINEL_MASTER", "tgp")
    refused = {
        "sentinel://a:pw-in-url-1@h1;sentinel://a:pw-in-url-2@h2/0": "different users or passwords",
        "sentinel://h1/0;sentinel://h2/1": "different databases",
        "sentinel://h1;redis://pw-in-url@h2/0": "is not a sentinel:// URL",
        "sentinel://u:pw-in-url@h1/0?ssl_cert_reqs=required": "TLS through Sentinel is not supported",
        "sentinel://h1;sentinel://h1/0": "names a Sentinel twice",
        "sentinel://h1:port/0": "port that is not a number",
    }
    for url, reason in refused.items():
        monkeypatch.setenv("REDIS_URL", url)
        with pytest.raises(ConfigError, match=reason) as caught:
            AgentConfig.from_env()
        assert "pw-in-url" not in str(caught.value)
    monkeypatch.setenv("REDIS_URL", sentinels)
    monkeypatch.setenv("TGP_REDIS_CA_FILE", str(tmp_path / "ca.pem"))
    with pytest.raises(ConfigError, match="TLS through Sentinel is not supported"):
        AgentConfig.from_env()
    monkeypatch.delenv("TGP_REDIS_CA_FILE")
    monkeypatch.setenv("TGP_REDIS_SENTINEL_MASTER", "tgp main")
    with pytest.raises(ConfigError, match="TGP_REDIS_SENTINEL_MASTER: .* is not a name"):
        AgentConfig.from_env()
    monkeypatch.setenv("TGP_REDIS_SENTINEL_MASTER", "tgp")
    password_file = tmp_path / "open.password"
    password_file.write_text("s3cret\n")
    password_file.chmod(0o644)
    monkeypatch.setenv("TGP_REDIS_SENTINEL_PASSWORD_FILE", str(password_file))
    with pytest.raises(ConfigError, match="open to other users"):
        AgentConfig.from_env()
    monkeypatch.setenv("TGP_REDIS_SENTINEL_PASSWORD", "s3cret")
    with pytest.raises(ConfigError, match="both set"):
        AgentConfig.from_env()
    monkeypatch.delenv("TGP_REDIS_SENTINEL_PASSWORD_FILE")

    # A name of the primary next to a plain URL: the agent refuses, the control plane warns.
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6390/0")
    with pytest.raises(ConfigError, match="TGP_REDIS_SENTINEL_MASTER, TGP_REDIS_SENTINEL_PASSWORD set, but"):
        AgentConfig.from_env()
    settings.REDIS_URL = "redis://127.0.0.1:6390/0"
    assert [m.id for m in check_broker()] == ["tgpadmin.W010"]
    monkeypatch.delenv("TGP_REDIS_SENTINEL_MASTER")
    monkeypatch.delenv("TGP_REDIS_SENTINEL_PASSWORD")
    assert check_broker() == []

    # One Sentinel only, asked without a password: it runs, with two warnings.
    settings.REDIS_URL = "sentinel://control:pw@127.0.0.1:26379/0"
    settings.REDIS_SENTINEL = Sentinel("tgp")
    assert [m.id for m in check_broker()] == ["tgpadmin.W011", "tgpadmin.W012"]
    settings.REDIS_URL = sentinels
    settings.REDIS_SENTINEL = Sentinel("tgp", "tgp-client", "s3cret")
    assert check_broker() == []
    assert parse_sentinel_url(sentinels).sentinels == (("127.0.0.1", 26379), ("127.0.0.1", 26380))


def test_the_fencing_check_outlasts_a_broker_outage_as_long_as_a_nodes_publishing_does():
    # A node's fencing check (and the control plane's cluster slots) read Redis directly.
    # Through a failover it must hold on as long as the node's reports do: it comes before
    # the install, and a check that gave up first failed the run (an update lock) for a
    # primary that the Sentinels promoted seconds later.
    from kombu.utils.functional import fxrange

    from agent.shared.protocol import PUBLISH_RETRY_POLICY as policy

    client = redis_client("sentinel://127.0.0.1:9/0", Sentinel("tgp"))  # connects to nothing until used
    retry = client.get_retry()
    assert retry is not None
    fencing = sum(retry._backoff.compute(failures) for failures in range(1, retry.get_retries() + 1))
    steps = fxrange(policy["interval_start"], policy["interval_max"] + policy["interval_start"],
                    policy["interval_step"], repeatlast=True)  # fmt: skip
    publishing = sum(min(next(steps), policy["interval_max"]) for _ in range(policy["max_retries"]))
    assert fencing >= publishing, (fencing, publishing)


class GoingDown:
    """The old primary as a failover meets it: a proxy to a real Redis that serves the
    client's connection (its handshake, a PING) and goes down with the fencing check's
    read (closes the connection unanswered, and refuses new ones); from then on
    `primary` is the promoted one, the one the Sentinels name."""

    def __init__(self, promoted: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.primary, self.promoted = self.port, promoted
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with socket.create_connection(("127.0.0.1", self.promoted)) as upstream:
            while (data := conn.recv(65536)) and b"HGET" not in data:
                upstream.sendall(data)
                conn.sendall(upstream.recv(65536))  # one command at a time: one reply
        self.listener.close()
        self.primary = self.promoted
        conn.close()


def test_a_connection_that_breaks_under_a_command_reconnects_to_the_primary_the_sentinels_name_now(redis_url):
    # The Sentinels' answer is played by discover_master (the failover itself, with real
    # Sentinels, is the rollout test above). The retries are short here; in production
    # they last ~75 s. Before, the retries all went to the old primary.
    from redis.backoff import ConstantBackoff
    from redis.retry import Retry

    old = GoingDown(promoted=redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"])
    client = redis_client("sentinel://127.0.0.1:9/0", Sentinel("tgp"), retry=Retry(ConstantBackoff(0.1), 3))
    client.connection_pool.sentinel_manager.discover_master = lambda _name: ("127.0.0.1", old.primary)
    assert client.ping()  # on the old primary
    client.hget("tgp-fence-test", "node")  # the fencing check's read: the old primary goes down under it
    assert client.connection_pool.get_connection().port == old.promoted
