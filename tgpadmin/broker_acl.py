"""Broker permissions: the Redis ACL users of tgpadmin and what each may do.

One user per node agent (``node-<hostname>``), ``control`` (control workers, beat and
the management commands), ``web`` (the Django web process), ``flower`` (monitoring),
``admin`` (for ``manage.py broker_acl`` itself and the operator), and the default
user turned off. docs/security-broker.md explains each grant; in short, from kombu's
Redis transport (kombu 5.7) and Celery 5.6 as tgpadmin configures them:

- A queue is a list per priority: ``Q``, ``Q\\x06\\x163``, ``Q\\x06\\x166``, ``Q\\x06\\x169``
  (kombu's ``sep`` and ``PRIORITY_STEPS``). Publishing to a direct queue is an LPUSH
  (Celery sends through the anonymous exchange: no ``_kombu.binding.*`` lookup);
  consuming is a BRPOP over the four. Declaring a queue (done by whoever publishes or
  consumes, unless the queue is ``no_declare``) is an LLEN of the four and an SADD to
  ``_kombu.binding.Q`` and ``_kombu.binding_permanent.Q``.
- Ack emulation keeps every taken message of every queue in the hash ``unacked``
  (index ``unacked_index``, lock ``unacked_mutex``) until its ack, and each consumer
  restores the overdue ones of all queues. The agents run without it (agent/app.py).
- Events are PUBLISHes on ``/<db>.celeryev/<type>``; remote control PUBLISHes on
  ``/<db>.celery.pidbox`` and answers into ``<id>.reply.celery.pidbox`` lists.

``acl_rules()`` is the pure part: names in, ACL rules out. The rest reads and writes
the password files and applies the rules to a server.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from kombu.transport.redis import PRIORITY_STEPS, Channel

from agent.shared.protocol import (
    CONTROL_QUEUE,
    HEARTBEATS,
    HOSTNAME_RE,
    HOSTNAME_RULE,
    OUT_PREFIX,
    SLOT_PREFIX,
    node_queue,
    slot_keys,
)
from agent.shared.sentinel import (
    Sentinel,
    SentinelConfigError,
    SentinelUrl,
    is_sentinel_url,
    parse_sentinel_url,
    server_urls,
)

log = logging.getLogger(__name__)

SEP = Channel.sep
# Redis 7.0 brought key permissions for reading or writing only (%R~, %W~) and selectors.
MODERN = (7, 0)
NODE_PREFIX = "node-"
ADMIN, CONTROL, WEB, FLOWER, DEFAULT = "admin", "control", "web", "flower", "default"
ROLES = (ADMIN, CONTROL, WEB, FLOWER)
# The task events a worker sends (Celery groups a worker's task events into task.multi);
# not worker.elect / worker.elect.ack, which only gossip uses.
WORKER_EVENTS = ("task.*", "worker.online", "worker.heartbeat", "worker.offline")
_GLOB = re.compile(r"([*?\[\]\\])")


class BrokerAclError(ValueError):
    """Input that cannot become broker users (a bad name, a refused connection...)."""


def glob_escape(text: str) -> str:
    """A name as a literal inside a Redis glob pattern."""
    return _GLOB.sub(r"\\\1", text)


def queue_keys(queue: str, *, literal: bool = True) -> tuple[str, ...]:
    """The Redis lists of one kombu queue, one per priority step, as key patterns."""
    name = glob_escape(queue) if literal else queue
    return (name, *(f"{name}{SEP}{step}" for step in PRIORITY_STEPS if step))


@dataclass(frozen=True)
class Grant:
    """Commands allowed on some keys and channels; on Redis 7 one selector."""

    why: str
    commands: tuple[str, ...]
    keys: tuple[str, ...] = ()  # with their prefix: ~ (read and write), %R~ or %W~
    channels: tuple[str, ...] = ()

    def selector(self) -> str:
        return "(" + " ".join([*self.keys, *(f"&{c}" for c in self.channels), *(f"+{c}" for c in self.commands)]) + ")"


@dataclass(frozen=True)
class BrokerUser:
    name: str
    grants: tuple[Grant, ...]
    everything: bool = False  # admin: every command, key and channel

    def rules(self, redis_version: tuple[int, ...] = MODERN) -> list[str]:
        """The permission rules (after ``reset on <password>``).

        Redis 7: the connection's keyless commands at the root, each grant a selector,
        so that a command is allowed only on the keys and channels of its own grant.
        Redis 6.2 has no selectors and no read-only or write-only keys: every command
        of the user is allowed on every key and channel of the user."""
        if self.everything:
            return ["~*", "&*", "+@all"]
        root = [g for g in self.grants if not g.keys and not g.channels]
        scoped = [g for g in self.grants if g.keys or g.channels]
        # `reset` leaves a user with every channel where acl-pubsub-default says so (the
        # default of Redis 6.2): no channel unless granted.
        if redis_version >= MODERN:
            return ["resetchannels", *(f"+{c}" for g in root for c in g.commands), *(g.selector() for g in scoped)]
        keys = _unique("~" + k.split("~", 1)[1] for g in scoped for k in g.keys)
        channels = _unique("&" + c for g in scoped for c in g.channels)
        commands = _unique("+" + c for g in self.grants for c in g.commands)
        return ["resetchannels", *keys, *channels, *commands]


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _connection(db: int, *more: str) -> Grant:
    # PING: kombu checks each new channel with it, redis-py's health checks too.
    # SELECT only where the URL names another database than 0.
    return Grant("the connection", ("ping", *(("select",) if db else ()), *more))


def _check_name(kind: str, name: str) -> str:
    # fullmatch: HOSTNAME_RE ends in $, which lets a trailing newline through, and a
    # newline would end a line of the ACL file.
    if not isinstance(name, str) or not HOSTNAME_RE.fullmatch(name):
        raise BrokerAclError(f"{kind} {name!r} is not {HOSTNAME_RULE}")
    return name


def node_user(hostname: str, cluster: str | None = None, *, db: int = 0) -> BrokerUser:
    """An agent (supervisor and worker, python -m agent HOSTNAME) with remote control
    off, no ack emulation and no queue declarations (agent/app.py)."""
    _check_name("node", hostname)
    ev = f"/{db}.celeryev/"
    grants = [
        _connection(db),
        Grant(
            "take its own commands (BRPOP), queue the next step of its own chain or a retry,"
            " and put back what it holds at a warm shutdown (LPUSH)",
            ("brpop", "lpush"),
            keys=tuple("~" + k for k in queue_keys(node_queue(hostname))),
        ),
        Grant(
            "send reports and chain hand-offs to the control queue, write-only (LPUSH)",
            ("lpush",),
            keys=tuple("%W~" + k for k in queue_keys(CONTROL_QUEUE)),
        ),
        Grant(
            "push its heartbeats onto the heartbeats list, write-only (RPUSH)",
            ("rpush",),
            keys=("%W~" + glob_escape(HEARTBEATS),),
        ),
        Grant(
            "send its worker's task and worker events (Flower)",
            ("publish",),
            channels=tuple(ev + event for event in WORKER_EVENTS),
        ),
    ]
    if cluster:
        _check_name("cluster", cluster)
        grants.append(
            Grant(
                "read its cluster's slot holders for the fencing check before a disruptive step (HGET)",
                ("hget",),
                keys=("%R~" + glob_escape(slot_keys(cluster)[0]),),
            )
        )
    return BrokerUser(NODE_PREFIX + hostname, tuple(grants))


def _queue_declarations(*queues: str) -> tuple[str, ...]:
    return tuple(f"~_kombu.{table}.{q}" for q in queues for table in ("binding", "binding_permanent"))


def control_user(*, db: int = 0) -> BrokerUser:
    """Control workers (consume ``control`` with ack emulation, gossip, mingle, remote
    control, events, results of started tasks), beat and the management commands."""
    ev, pidbox = f"/{db}.celeryev/", f"/{db}.celery.pidbox"
    nodes = ("~node.*",)
    return BrokerUser(
        CONTROL,
        (
            _connection(db, "multi", "exec", "discard", "unwatch", "time", "script|load", "script|exists"),
            Grant(
                "consume the control queue, publish and restore to it",
                ("brpop", "lpush", "rpush", "llen"),
                keys=tuple("~" + k for k in queue_keys(CONTROL_QUEUE)),
            ),
            Grant("publish node commands (and declare the queues)", ("lpush", "rpush", "llen"), keys=nodes),
            Grant(
                "take the nodes' heartbeats off their list in batches (manage.py heartbeats)",
                ("blpop", "lpop", "llen"),
                keys=("~" + glob_escape(HEARTBEATS),),
            ),
            Grant(
                "queue declarations, remote-control reply routing, kombu's binding expiry scripts",
                ("sadd", "srem", "smembers", "zadd", "zrem", "zrangebyscore", "exists", "del", "evalsha"),
                keys=("~_kombu.binding.*", "~_kombu.binding_permanent.*", "~_kombu.binding_deadlines"),
            ),
            Grant(
                "ack emulation: keep taken messages until acked, restore overdue ones",
                ("hset", "hget", "hdel", "zadd", "zrem", "zrange", "set", "get", "del", "watch", "evalsha"),
                keys=("~unacked", "~unacked_index", "~unacked_mutex"),
            ),
            Grant(
                "remote control (mingle, inspect): its own mailbox queue, replies",
                ("llen", "lpush", "brpop", "del", "pexpire", "publish", "psubscribe", "punsubscribe"),
                keys=tuple("~" + k for k in queue_keys("*.celery.pidbox", literal=False)),
                channels=(pidbox,),
            ),
            Grant(
                "events: send them, gossip's event queue",
                ("llen", "del", "publish", "psubscribe", "punsubscribe"),
                keys=("~celeryev.*",),
                channels=(ev + "*", ev + "worker.*"),
            ),
            Grant(
                "results of started tasks (task_track_started) and their notifications",
                ("get", "mget", "set", "setex", "del", "expire", "publish", "subscribe", "unsubscribe"),
                keys=("~celery-task-meta-*",),
                channels=("celery-task-meta-*",),
            ),
            Grant(
                "cluster update slots and places out of the load balancer (acquire, release, holders: scripts)",
                ("evalsha", "hget", "hgetall", "hlen", "hset", "hdel", "incr"),
                keys=(f"~{SLOT_PREFIX}:*", f"~{OUT_PREFIX}:*"),
            ),
        ),
    )


def web_user(*, db: int = 0) -> BrokerUser:
    """The Django web process: starts runs (the chains' first tasks), sends notices,
    frees and hands on update slots. Publishes only; reads no queue's contents."""
    return BrokerUser(
        WEB,
        (
            _connection(db, "multi", "exec", "discard", "time", "script|load", "script|exists"),
            Grant(
                "publish to the control and node queues (LPUSH; LLEN as it declares them)",
                ("llen", "lpush"),
                keys=(*("~" + k for k in queue_keys(CONTROL_QUEUE)), "~node.*"),
            ),
            Grant(
                "declare those queues (their binding tables)",
                ("sadd",),
                keys=_queue_declarations(CONTROL_QUEUE, "node.*"),
            ),
            Grant(
                "the heartbeats waiting, for /metrics (LLEN only, read-only)",
                ("llen",),
                keys=("%R~" + glob_escape(HEARTBEATS),),
            ),
            Grant("task-sent events (Flower)", ("publish",), channels=(f"/{db}.celeryev/task.sent",)),
            Grant(
                "wait for results it is told about (Celery subscribes for every task sent by name)",
                ("get", "mget", "subscribe", "unsubscribe"),
                keys=("%R~celery-task-meta-*",),
                channels=("celery-task-meta-*",),
            ),
            Grant(
                "cluster update slots and places out of the load balancer: holders, release, hand on (scripts)",
                ("evalsha", "hget", "hgetall", "hlen", "hset", "hdel", "incr"),
                keys=(f"~{SLOT_PREFIX}:*", f"~{OUT_PREFIX}:*"),
            ),
        ),
    )


def flower_user(*, db: int = 0) -> BrokerUser:
    """Flower (python -m tgpadmin.flower) with TGP_BROKER_ACK_EMULATION=0: events,
    queue lengths, and the remote-control broadcasts Flower cannot run without."""
    pidbox_tables = ("celeryev", "reply.celery.pidbox", "celery.pidbox")
    return BrokerUser(
        FLOWER,
        (
            _connection(db, "multi", "exec", "discard", "time", "script|load", "script|exists"),
            Grant(
                "queue lengths for the broker page (LLEN only, read-only)",
                ("llen",),
                keys=(*("%R~" + k for k in queue_keys(CONTROL_QUEUE)), "%R~node.*"),
            ),
            Grant(
                "its own event queue and remote-control reply queues",
                ("llen", "brpop", "del"),
                keys=("~celeryev.*", *("~" + k for k in queue_keys("*.reply.celery.pidbox", literal=False))),
            ),
            Grant(
                "declare those queues, kombu's binding expiry scripts",
                ("sadd", "srem", "zadd", "zrem", "zrangebyscore", "exists", "del", "evalsha"),
                keys=(*_queue_declarations(*pidbox_tables), "~_kombu.binding_deadlines"),
            ),
            Grant("receive every event", ("psubscribe", "punsubscribe"), channels=(f"/{db}.celeryev/*",)),
            Grant(
                "remote-control broadcasts: the heartbeat request its event receiver sends at"
                " every connect, inspect for the worker pages (Redis cannot tell them from others)",
                ("publish",),
                channels=(f"/{db}.celery.pidbox",),
            ),
        ),
    )


def admin_user() -> BrokerUser:
    return BrokerUser(ADMIN, (Grant("everything: manage.py broker_acl and the operator", ("@all",)),), everything=True)


def node_names(nodes: Iterable[str | tuple[str, str | None]]) -> dict[str, str | None]:
    """hostname -> cluster name (or None), checked."""
    found: dict[str, str | None] = {}
    for item in nodes:
        hostname, cluster = (item, None) if isinstance(item, str) else item
        _check_name("node", hostname)
        if cluster:
            _check_name("cluster", cluster)
        found[hostname] = cluster or None
    return found


def broker_users(nodes: Iterable[str | tuple[str, str | None]], *, db: int = 0) -> list[BrokerUser]:
    """Every user tgpadmin needs (admin first), for these nodes (hostname, or
    (hostname, cluster name) for a cluster node)."""
    if isinstance(db, bool) or not isinstance(db, int) or db < 0:
        raise BrokerAclError(f"the database number must be an integer >= 0, not {db!r}")
    fixed = [admin_user(), control_user(db=db), web_user(db=db), flower_user(db=db)]
    return fixed + [node_user(h, c, db=db) for h, c in sorted(node_names(nodes).items())]


def acl_rules(
    nodes: Iterable[str | tuple[str, str | None]], *, db: int = 0, redis_version: tuple[int, ...] = MODERN
) -> dict[str, list[str]]:
    """The ACL rules of every user, by user name, as ``ACL SETUSER <name> reset on
    <password> <rules...>`` takes them; ``default`` is only reset (turned off).
    Pure: the same names give the same rules."""
    rules = {user.name: user.rules(redis_version) for user in broker_users(nodes, db=db)}
    rules[DEFAULT] = []
    return rules


# --- passwords, URLs, applying ------------------------------------------------------


def password_hash(password: str) -> str:
    """The form Redis keeps (``#<sha256>``): the ACL file and the commands carry no password."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def setuser_args(name: str, rules: list[str], password: str | None) -> list[str]:
    if name == DEFAULT:
        return [name, "reset", "resetchannels"]
    return [name, "reset", "on", password_hash(password or ""), *rules]


def env_password_name(user: str) -> str:
    return "TGP_BROKER_PASSWORD_" + re.sub(r"[^A-Z0-9]", "_", user.upper())


def _sentinel(url: str) -> SentinelUrl:
    try:
        return parse_sentinel_url(url)
    except SentinelConfigError as exc:
        raise BrokerAclError(str(exc)) from None


def base_url(url: str) -> str:
    """The URL without its user and password (in every entry of a sentinel:// URL)."""
    if is_sentinel_url(url):
        return replace(_sentinel(url), username="", password="").url()
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def user_url(base: str, user: str, password: str) -> str:
    if is_sentinel_url(base):
        # The broker user on the Redis servers, in every entry (agent/shared/sentinel.py).
        return replace(_sentinel(base), username=user, password=password).url()
    parts = urlsplit(base)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"))


def url_db(url: str) -> int:
    if is_sentinel_url(url):
        return _sentinel(url).db
    path = urlsplit(url).path.strip("/")
    try:
        return int(path or 0)
    except ValueError:
        raise BrokerAclError(f"the database in {base_url(url)!r} is not a number") from None


def redis_version_of(text: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)", text)
    if not match:
        raise BrokerAclError(f"not a Redis version: {text!r}")
    return tuple(int(p) for p in match.groups())


class Credentials:
    """Each user's password, kept in DIR/<user>.url (the user's broker URL, mode 0600),
    or taken from TGP_BROKER_PASSWORD_<USER>; generated when neither has one."""

    def __init__(self, directory: Path, base: str, *, rotate: bool = False) -> None:
        self.directory, self.base, self.rotate = directory, base_url(base), rotate

    def path(self, user: str) -> Path:
        return self.directory / f"{user}.url"

    def password(self, user: str) -> str:
        from_env = os.environ.get(env_password_name(user), "")
        if from_env:
            return from_env
        if not self.rotate and self.path(user).is_file():
            kept = unquote(urlsplit(self.path(user).read_text().strip()).password or "")
            if kept:
                return kept
        return secrets.token_urlsafe(32)

    def write(self, user: str, password: str) -> Path:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return write_secret(self.path(user), user_url(self.base, user, password) + "\n")

    def stale(self, keep: Iterable[str]) -> list[Path]:
        """URL files of node users that are no longer wanted."""
        wanted = {f"{name}.url" for name in keep}
        pattern = f"{NODE_PREFIX}*.url"
        return (
            sorted(p for p in self.directory.glob(pattern) if p.name not in wanted) if self.directory.is_dir() else []
        )


def write_secret(path: Path, text: str | bytes) -> Path:
    """Written whole or not at all, never readable by others, even for a moment."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)
    return path


def acl_file(rules: Mapping[str, list[str]], passwords: Mapping[str, str]) -> bytes:
    """The users as a Redis ACL file (``redis-server --aclfile``): password hashes only.
    Lines are bytes: the priority keys hold kombu's separator \\x06\\x16 as it is."""
    lines = [" ".join(["user", *setuser_args(name, r, passwords.get(name))]) for name, r in rules.items()]
    return ("\n".join(lines) + "\n").encode("latin-1")


def printable(rule: str) -> str:
    """A rule for a terminal: control characters as \\xNN."""
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 0x20 else c for c in rule)


@dataclass
class Applied:
    redis_version: tuple[int, ...]
    users: list[str]
    deleted: list[str]
    saved: bool  # ACL SAVE wrote the server's ACL file


def apply(admin_url: str, users: list[BrokerUser], passwords: Mapping[str, str]) -> Applied:
    """Make the server's users these (admin first, the default user last); node users
    that are not in `users` are deleted. Rules are reset each time: idempotent."""
    import redis

    def connect(url: str) -> redis.Redis:
        return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)

    try:
        client = connect(admin_url)
        version = redis_version_of(str(client.info("server")["redis_version"]))
        admin = next(u for u in users if u.name == ADMIN)
        client.execute_command("ACL", "SETUSER", *_encoded(setuser_args(ADMIN, admin.rules(), passwords[ADMIN])))
    except redis.exceptions.NoPermissionError as exc:
        raise BrokerAclError(f"the user of {base_url(admin_url)} may not manage users: {exc}") from None
    except redis.exceptions.RedisError as exc:
        raise BrokerAclError(f"cannot apply the users to {base_url(admin_url)}: {exc}") from None
    client.close()
    # From here on as admin, whoever the URL named (the default user loses everything below).
    client = connect(user_url(admin_url, ADMIN, passwords[ADMIN]))
    try:
        for user in users:
            if user.name != ADMIN:
                args = setuser_args(user.name, user.rules(version), passwords[user.name])
                client.execute_command("ACL", "SETUSER", *_encoded(args))
        wanted = {u.name for u in users}
        existing = [u.decode() if isinstance(u, bytes) else str(u) for u in client.execute_command("ACL", "USERS")]
        deleted = [u for u in existing if u.startswith(NODE_PREFIX) and u not in wanted]
        if deleted:
            client.execute_command("ACL", "DELUSER", *deleted)
        client.execute_command("ACL", "SETUSER", *setuser_args(DEFAULT, [], None))
        saved = bool(client.config_get("aclfile").get("aclfile"))
        if saved:
            client.execute_command("ACL", "SAVE")
    except redis.exceptions.RedisError as exc:
        raise BrokerAclError(
            f"applying the users to {base_url(admin_url)} failed half-way (run it again): {exc}"
        ) from None
    finally:
        client.close()
    return Applied(version, [u.name for u in users], deleted, saved)


def servers(admin_url: str, sentinel: Sentinel | None) -> list[str]:
    """Where the users must be: the server of a redis:// URL; for a sentinel:// URL the
    primary and every replica the Sentinels know (ACL users are not replicated, and a
    replica without them refuses every process once a failover makes it the primary)."""
    if not is_sentinel_url(admin_url):
        return [admin_url]
    if sentinel is None:
        raise BrokerAclError(
            f"{base_url(admin_url)} names Sentinels: set TGP_REDIS_SENTINEL_MASTER (and their credentials) "
            "so that they can be asked for the servers."
        )
    import redis

    try:
        return server_urls(admin_url, sentinel)
    except redis.exceptions.RedisError as exc:
        raise BrokerAclError(f"cannot ask the Sentinels of {base_url(admin_url)} for the servers: {exc}") from None


def _encoded(args: list[str]) -> list[bytes]:
    return [a.encode("latin-1") for a in args]
