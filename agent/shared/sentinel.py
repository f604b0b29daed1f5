"""Redis Sentinel: the broker's primary found through the Sentinels, the same way on
both sides (the control plane's settings, the agent's config and every client that
talks to Redis directly).

Beyond one host, Redis runs as a primary and replicas watched by Sentinels, and a
failover can move the primary to another server at any time. So no process names a
Redis server; each names the Sentinels and asks them where the primary is now:

    sentinel://USER:PASSWORD@s1:26379;sentinel://USER:PASSWORD@s2:26379;sentinel://USER:PASSWORD@s3:26379/0

in REDIS_URL or the file TGP_REDIS_URL_FILE names (``manage.py broker_acl --url-base``
writes one per broker user). USER:PASSWORD is the process's broker user on the Redis
servers, where the ACL users live (on every server: ACL is not replicated), not on the
Sentinels. kombu, Celery's result backend and Flower take these URLs as they are, plus
the name the Sentinels monitor the primary under (TGP_REDIS_SENTINEL_MASTER) and the
Sentinels' own credentials (TGP_REDIS_SENTINEL_USER, TGP_REDIS_SENTINEL_PASSWORD_FILE)
in their transport options: ``Sentinel.transport_options()``.

What the libraries do with such a URL (kombu 5.7 ``SentinelChannel``, Celery 5.6
``SentinelBackend``, redis-py 8 ``redis.sentinel``): every ``;``-separated entry gives a
Sentinel's address; user, password and database come from the first entry only
(kombu's fail-over to the next entry takes that entry's), hence ``SentinelUrl.url()``
writes them into every entry. Sentinel's own credentials are ``sentinel_kwargs``; without
them redis-py connects to the Sentinels with no password and no timeout.

Not supported: TLS through Sentinel (kombu would need ``broker_use_ssl``, the result
backend ``redis_backend_use_ssl`` and the Sentinels' connections ``ssl`` in their
kwargs, none of which the tests cover). A sentinel:// URL with ``ssl_*`` options, or
with TGP_REDIS_CA_FILE, is refused with that reason.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    import redis

SCHEME = "sentinel"
DEFAULT_PORT = 26379
# A Sentinel that does not answer must not hang the process that asks it (redis-py's
# default for the Sentinels' connections is no timeout at all once sentinel_kwargs is given).
SENTINEL_TIMEOUT = 5.0
# A failover takes the Sentinels' down-after-milliseconds, an election and a promotion:
# seconds. A direct client (cluster slots, the agent's fencing check) that gave up at the
# first refused connection would fail a run for a broker that is about to come back, so
# it retries (0.2 s between tries, doubling up to 2 s) for at least as long as a node's
# publishing does (protocol.PUBLISH_RETRY_POLICY, about 75 s), as kombu and Celery do for
# the broker and the result backend. Half a minute was too short: under load a failover
# took longer, and a node's fencing check before its install failed the run while its
# reports, sent after it, got through (tests/test_sentinel.py).
FAILOVER_RETRIES = 42
FAILOVER_BACKOFF_CAP = 2.0
MASTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class SentinelConfigError(ValueError):
    """A sentinel:// URL or Sentinel setting that cannot work; the message says why
    (never with a password in it)."""


def is_sentinel_url(url: str) -> bool:
    return url.startswith(f"{SCHEME}://")


@dataclass(frozen=True)
class SentinelUrl:
    """A sentinel:// URL, taken apart: the Sentinels' addresses, the broker user (on the
    Redis servers) and the database."""

    sentinels: tuple[tuple[str, int], ...]
    username: str = ""
    password: str = field(default="", repr=False)
    db: int = 0

    def url(self) -> str:
        """The URL as kombu and Celery need it: user, password and database in every entry."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"
        return ";".join(f"{SCHEME}://{auth}{_netloc(host, port)}/{self.db}" for host, port in self.sentinels)

    def server_url(self, host: str, port: int) -> str:
        """A plain redis:// URL of one Redis server with this URL's user, password and database."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"
        return f"redis://{auth}{_netloc(host, port)}/{self.db}"


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_sentinel_url(url: str, source: str = "the broker URL") -> SentinelUrl:
    """Take a sentinel:// URL apart, checking each entry; SentinelConfigError names `source`.

    User, password and database may stand in the first entry only or in every one, but
    not differ: kombu and Celery would use the first entry's and hide the mistake until
    a fail-over to another entry."""
    sentinels: list[tuple[str, int]] = []
    users: set[tuple[str, str]] = set()
    dbs: set[int] = set()
    for number, entry in enumerate(url.split(";"), 1):
        where = f"entry {number} of {source}"
        entry = entry.strip()
        if not is_sentinel_url(entry):
            raise SentinelConfigError(
                f"{where} is not a {SCHEME}:// URL: with Sentinel, every ';'-separated entry names a Sentinel."
            )
        parts = urlsplit(entry)
        if parts.query or parts.fragment:
            # Not echoed: a query may carry a password.
            raise SentinelConfigError(
                f"{where} has options (after '?' or '#'): tgpadmin takes none in a {SCHEME}:// URL, "
                "and TLS through Sentinel is not supported."
            )
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            raise SentinelConfigError(f"{where} has a port that is not a number.") from None
        if not host:
            raise SentinelConfigError(f"{where} names no host.")
        sentinels.append((host, port or DEFAULT_PORT))
        if parts.username is not None or parts.password is not None:
            users.add((unquote(parts.username or ""), unquote(parts.password or "")))
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise SentinelConfigError(f"{where}: the database {path!r} is not a number.")
            dbs.add(int(path))
    if len(users) > 1:
        raise SentinelConfigError(f"the entries of {source} name different users or passwords: give one to all.")
    if len(dbs) > 1:
        raise SentinelConfigError(f"the entries of {source} name different databases: {sorted(dbs)}.")
    if len(set(sentinels)) != len(sentinels):
        raise SentinelConfigError(f"{source} names a Sentinel twice.")
    username, password = users.pop() if users else ("", "")
    return SentinelUrl(tuple(sentinels), username, password, dbs.pop() if dbs else 0)


@dataclass(frozen=True)
class Sentinel:
    """Where the Sentinels' primary is known (its name) and how to log on to the
    Sentinels themselves. Frozen and hashable: clients are cached per (url, Sentinel)."""

    master: str
    username: str = ""
    password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not MASTER_NAME_RE.fullmatch(self.master):
            raise SentinelConfigError(
                f"the Sentinels' master name {self.master!r} is not a name (letters, digits, '.', '_', '-')."
            )

    def sentinel_kwargs(self) -> dict[str, Any]:
        """The connection arguments of the Sentinels (not of the Redis servers)."""
        kwargs: dict[str, Any] = {"socket_connect_timeout": SENTINEL_TIMEOUT, "socket_timeout": SENTINEL_TIMEOUT}
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password
        return kwargs

    def transport_options(self) -> dict[str, Any]:
        """For kombu's broker_transport_options and Celery's result_backend_transport_options
        (Flower reads the broker's too)."""
        return {"master_name": self.master, "sentinel_kwargs": self.sentinel_kwargs()}


def redis_client(url: str, sentinel: Sentinel | None = None, **kwargs: Any) -> redis.Redis:
    """A redis-py client of the broker: ``Redis.from_url`` for a redis://, rediss:// or
    unix:// URL; for a sentinel:// URL one of the primary, found through the Sentinels
    again whenever its connection breaks (a failover), with retries that outlast one."""
    import redis
    import redis.sentinel
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **kwargs)
    if sentinel is None:
        raise SentinelConfigError(
            f"a {SCHEME}:// broker URL needs the Sentinels' master name: set TGP_REDIS_SENTINEL_MASTER."
        )
    parsed = parse_sentinel_url(url)
    kwargs.setdefault("retry", Retry(ExponentialBackoff(cap=FAILOVER_BACKOFF_CAP, base=0.1), FAILOVER_RETRIES))
    kwargs.setdefault("connection_class", _primary_connection())
    manager = redis.sentinel.Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel.sentinel_kwargs())
    return manager.master_for(
        sentinel.master,
        username=parsed.username or None,
        password=parsed.password or None,
        db=parsed.db,
        **kwargs,
    )


@functools.cache
def _primary_connection() -> type:
    """redis-py's connection to the primary the Sentinels name, which asks them again
    each time it connects anew. redis-py (8.1) asks only in connect(): a connection that
    broke under a command reconnects in send_packed_command to the address it had, and
    retried the old primary for the whole retry budget while the Sentinels had promoted
    another (a node's fencing check failed its run during a failover)."""
    from redis.sentinel import SentinelManagedConnection

    class PrimaryConnection(SentinelManagedConnection):
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            if not self._sock:
                self.connect()  # the Sentinels' primary now, each retry asking again
            super().send_packed_command(command, check_health)

    return PrimaryConnection


def server_urls(url: str, sentinel: Sentinel) -> list[str]:
    """redis:// URLs (with the URL's user) of the primary and of every replica the
    Sentinels know, down or not, primary first: what needs ACL users (ACL is not
    replicated). redis.exceptions.ConnectionError if no Sentinel knows the primary."""
    import redis.sentinel

    parsed = parse_sentinel_url(url)
    manager = redis.sentinel.Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel.sentinel_kwargs())
    try:
        host, port = manager.discover_master(sentinel.master)
        replicas: list[tuple[str, int]] = []
        for asked in manager.sentinels:
            try:
                found = asked.sentinel_slaves(sentinel.master)
            except redis.exceptions.RedisError:
                continue
            replicas = [(r["ip"], int(r["port"])) for r in found]
            break
    finally:
        manager.close()
    servers = [(host, int(port)), *sorted(set(replicas) - {(host, int(port))})]
    return [parsed.server_url(h, p) for h, p in servers]
