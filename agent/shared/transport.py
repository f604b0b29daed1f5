"""kombu's Redis transports, with one Redis client per channel for what it sends.

kombu builds a new ``redis.Redis`` object for each message it publishes (and for each
event it flushes): ``Channel.conn_or_acquire`` without a client calls ``_create_client``.
That object holds no connection of its own (it takes one from the channel's pool for
each command), but building it copies redis-py's table of ~170 response callbacks,
key by key: 130-180 us of CPU on a 2-core machine, which is more than the LPUSH it
sends. A node's hand-off between two steps publishes five messages (the chain's next
step, the outcome report, three task events), all on the path from one step's end to
the next one's start (bench/orchestration.py). Here a channel builds that client once
and reuses it: a ``redis.Redis`` is safe to share between threads (each command takes
a connection from the pool and gives it back), and it lives and dies with the channel,
as its pool does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class _SharedClient:
    """conn_or_acquire without a client: the channel's own, made on first use."""

    _create_client: Any

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self.__dict__.get("_tgp_shared_client")
        if shared is None:
            shared = self.__dict__["_tgp_shared_client"] = self._create_client()
        yield shared


class Channel(_SharedClient, kombu_redis.Channel):
    pass


class SentinelChannel(_SharedClient, kombu_redis.SentinelChannel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def transport_for(url: str) -> str:
    """The transport class for a broker URL (Celery's broker_transport), as a dotted path."""
    from agent.shared.sentinel import is_sentinel_url

    return f"{__name__}:{'SentinelTransport' if is_sentinel_url(url) else 'Transport'}"
