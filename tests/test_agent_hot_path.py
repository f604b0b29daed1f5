"""The node's side of a hand-off between two steps, made cheaper (bench/orchestration.py):
the record of commands carried out is appended to, not rewritten, and the agent's broker
channel builds one Redis client for what it publishes, not one per message."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import redis

from agent import identity
from agent.app import app as agent_app
from agent.shared.transport import SentinelTransport, Transport, transport_for


@pytest.fixture
def node(agent_settings: Any) -> str:
    agent_settings()
    return f"gw-{uuid.uuid4().hex[:6]}"


def test_a_command_carried_out_is_one_line_more_and_refused_from_then_on(node):
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    identity.remember(node, first, time.time() + 3600)
    identity.remember(node, second, time.time() + 3600)
    assert identity.carried_out(node, first) and identity.carried_out(node, second)
    assert not identity.carried_out(node, uuid.uuid4().hex)
    lines = identity._done_file(node).read_text().split()[1::2]
    assert [json.loads(word) for word in lines] == [first, second]


def test_an_id_that_is_not_a_plain_word_cannot_hide_another(node):
    # The id is the control plane's (a uuid), but the record must not depend on it.
    identity.remember(node, "a\n1.0 b", time.time() + 3600)
    assert identity.carried_out(node, "a\n1.0 b")
    assert not identity.carried_out(node, "b")


def test_a_line_cut_short_by_a_crash_counts_for_nothing_and_breaks_nothing(node):
    kept = uuid.uuid4().hex
    identity.remember(node, kept, time.time() + 3600)
    with open(identity._done_file(node), "a") as record:
        record.write('\n1.0 "cut')  # a line as remember begins it, cut short
    identity.remember(node, "next", time.time() + 3600)
    assert identity.carried_out(node, kept) and identity.carried_out(node, "next")


def test_the_record_is_rewritten_without_expired_commands_once_it_has_grown(node, monkeypatch):
    monkeypatch.setattr(identity, "DONE_COMPACT_AT", 100)
    path = identity._done_file(node)
    for i in range(6):
        identity.remember(node, f"old-{i}", time.time() - 1)  # expired: its expiry refuses it now
    live = uuid.uuid4().hex
    identity.remember(node, live, time.time() + 3600)
    assert path.stat().st_size < 100
    assert identity.carried_out(node, live)
    assert not identity.carried_out(node, "old-0"), "expired, dropped when the record was rewritten"


def test_the_earlier_json_record_is_still_read_and_then_taken_over(node):
    path = identity._done_file(node)
    legacy = path.with_name(identity.LEGACY_DONE_NAME)
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy.write_text(json.dumps({"before-upgrade": time.time() + 3600, "gone": time.time() - 1}))
    assert identity.carried_out(node, "before-upgrade")
    identity.remember(node, "after-upgrade", time.time() + 3600)
    assert not legacy.exists()
    assert identity.carried_out(node, "before-upgrade") and identity.carried_out(node, "after-upgrade")
    assert not identity.carried_out(node, "gone")


def test_the_agent_publishes_through_one_redis_client_per_channel(redis_url, monkeypatch):
    made: list[Any] = []
    real = redis.Redis.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        real(self, *args, **kwargs)

    queue = f"hot-{uuid.uuid4().hex[:8]}"
    with agent_app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
        channel = conn.default_channel
        with conn.Producer(channel) as producer:
            producer.publish({"n": 0}, routing_key=queue, declare=[])
            monkeypatch.setattr(redis.Redis, "__init__", counting)
            for n in range(1, 6):
                producer.publish({"n": n}, routing_key=queue)
        assert made == [], "no client built per message"
        client = redis.Redis.from_url(redis_url)
        assert client.llen(queue) == 6
        client.delete(queue)


def test_a_sentinel_url_keeps_the_sentinel_transport():
    assert transport_for("sentinel://127.0.0.1:26379/0").endswith(":SentinelTransport")
    assert transport_for("rediss://127.0.0.1:6379/0").endswith(":Transport")
    assert issubclass(SentinelTransport.Channel, SentinelTransport.__mro__[1].Channel)
