"""The cluster cap: no more nodes of a cluster update at the same time than
``Cluster.max_parallel_updates`` allows.

A counting semaphore in Redis whose slots are owned by node names. Each slot
carries a fencing token (from a per-cluster counter that only ever grows), so a
destructive step can ask ``check()`` right before it acts and a holder whose
slot was force-released by an operator stops instead of updating alongside
the node that took its place.

Slots have no TTL on purpose: a slot is held for exactly as long as the node is
out of service, which can be an hour-long download plus a reboot. The workflow
releases it once the node is verified back; an operator frees a slot whose
holder is gone with ``force_release()``.

Storage, per cluster (the braces are a Redis Cluster hash tag, so both keys of
a cluster live in the same hash slot and one script may touch both):

    {prefix}:{<cluster>}:holders   hash  node -> "<token>:<since epoch ms>"
    {prefix}:{<cluster>}:fence     int   the last token handed out
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from agent.shared.protocol import SLOT_PREFIX, parse_slot_holder, slot_keys
from agent.shared.sentinel import Sentinel, redis_client

log = logging.getLogger(__name__)

# Check, count and claim in one script: Redis runs it without interleaving any
# other command, so two nodes can never both see the last free slot.
_ACQUIRE = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held then
  return tonumber(string.match(held, '^(%d+):'))
end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[2]) then
  return false
end
local token = redis.call('INCR', KEYS[2])
local now = redis.call('TIME')
local since = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
redis.call('HSET', KEYS[1], ARGV[1], token .. ':' .. since)
return token
"""

# Compare-and-delete: with a token, a holder that lost its slot (force-released,
# then re-acquired by a newer run of the same node) cannot free the new slot.
_RELEASE = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
if not held then
  return 0
end
if ARGV[2] ~= '' and string.match(held, '^(%d+):') ~= ARGV[2] then
  return 0
end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""


@dataclass(frozen=True)
class SlotHolder:
    node: str
    token: int
    since: datetime


def _text(value: bytes | str) -> str:
    # The client may or may not have been built with decode_responses.
    return value.decode() if isinstance(value, bytes) else value


def _parse(value: bytes | str) -> tuple[int, datetime]:
    token, since_ms = parse_slot_holder(value)
    return token, datetime.fromtimestamp(since_ms / 1000, tz=UTC)


def _check_name(kind: str, name: str) -> None:
    if not name:
        raise ValueError(f"the {kind} name must not be empty")


class ClusterSlots:
    def __init__(self, client: redis.Redis, prefix: str = SLOT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    def _keys(self, cluster: str) -> list[str]:
        return list(slot_keys(cluster, self.prefix))  # the layout the agents' fencing check reads

    def acquire(self, cluster: str, node: str, cap: int) -> int | None:
        """The node's fencing token if it holds a slot (newly, or already: the
        same token again), None if the cluster is full.

        A lowered cap takes effect as slots are released: current holders keep
        theirs, nobody new gets one until fewer than `cap` are held.
        """
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"cap must be an integer >= 1, not {cap!r}")
        _check_name("node", node)
        token = self._acquire(keys=self._keys(cluster), args=[node, cap])
        return None if token is None else int(token)

    def release(self, cluster: str, node: str, token: int | None = None) -> bool:
        """Free the node's slot; with a token only if it is still that slot.
        True if a slot was freed."""
        _check_name("node", node)
        expected = "" if token is None else str(int(token))
        return bool(self._release(keys=self._keys(cluster)[:1], args=[node, expected]))

    def check(self, cluster: str, node: str, token: int) -> bool:
        """The fencing check: True only while the node holds the slot with exactly this token."""
        _check_name("node", node)
        held = self.client.hget(self._keys(cluster)[0], node)
        return held is not None and _parse(held)[0] == token

    def holders(self, cluster: str) -> list[SlotHolder]:
        raw = self.client.hgetall(self._keys(cluster)[0])
        found = [SlotHolder(_text(node), *_parse(value)) for node, value in raw.items()]
        return sorted(found, key=lambda h: (h.since, h.token))

    def force_release(self, cluster: str, node: str) -> bool:
        """Operator action: free the slot of a holder that is gone. Its old token
        stops passing check(), so should it come back it cannot act on it."""
        _check_name("node", node)
        freed = bool(self.client.hdel(self._keys(cluster)[0], node))
        if freed:
            log.warning("update slot of %s in cluster %s force-released", node, cluster)
        return freed


def slots_for_url(url: str, prefix: str = SLOT_PREFIX, sentinel: Sentinel | None = None) -> ClusterSlots:
    """The slots in the broker's Redis; for a sentinel:// URL in whichever server is the
    primary, with `sentinel` (settings.REDIS_SENTINEL) saying how to ask the Sentinels."""
    return ClusterSlots(redis_client(url, sentinel), prefix)


@functools.cache
def shared_slots(url: str, prefix: str = SLOT_PREFIX, sentinel: Sentinel | None = None) -> ClusterSlots:
    """One client (and connection pool) per URL and process, not a connection per call."""
    return slots_for_url(url, prefix, sentinel)
