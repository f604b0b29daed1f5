"""Heartbeats off the broker in batches (issue 16, `manage.py heartbeats`): a batch
costs the same few queries however many nodes it holds, every message in it is
checked as control.node_report checks one, and a real agent's heartbeats reach its
node's page through the command."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import redis
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agent import identity
from agent.shared import signing
from agent.shared.protocol import HEARTBEATS, NodeReport, Snapshot
from nodes.models import Node
from tgpadmin.processes import wait_for
from updates import heartbeats

pytestmark = pytest.mark.django_db

STATE = {"installed_version": "2.1.0", "boot_id": "b1", "agent_instance": "a1", "users": ("alice",)}


@pytest.fixture
def seen_resolution(settings):
    settings.TGP_SEEN_RESOLUTION = 30.0


def beat(hostname: str, *, about: str | None = None, kind: str = "node_report", **fields) -> bytes:
    """A heartbeat as the node's supervisor pushes it (agent.tasks.send_heartbeat)."""
    report = NodeReport(about or hostname, Snapshot(**{**STATE, **fields})).to_wire()
    return signing.encode(identity.signed(hostname, kind, report))


def queries(messages: list[bytes]) -> tuple[heartbeats.Taken, list[str]]:
    with CaptureQueriesContext(connection) as captured:
        taken = heartbeats.take(messages)
    return taken, [q["sql"] for q in captured.captured_queries]


def test_a_batch_costs_the_same_queries_for_3_nodes_as_for_30(make_node, agent_settings, seen_resolution):
    nodes = [make_node("hb").hostname for _ in range(30)]
    heartbeats.take([beat(n) for n in nodes])  # the first heartbeats store each node's state
    small = queries([beat(n) for n in nodes[:3]])
    large = queries([beat(n) for n in nodes])
    assert (small[0].stored, large[0].stored) == (3, 30)
    assert len(large[1]) == len(small[1]), large[1]
    assert not [q for q in large[1] if q.lstrip().upper().startswith(("UPDATE", "INSERT", "DELETE"))]


def test_a_heartbeat_in_a_batch_stores_what_it_changes(make_node, agent_settings, seen_resolution):
    node = make_node("hb")
    heartbeats.take([beat(node.hostname)])
    heartbeats.take([beat(node.hostname, users=("alice", "bob"), logon_enabled=False)])
    stored = Node.objects.get(pk=node.pk)
    assert (stored.logged_in_users, stored.logon_enabled) == (["alice", "bob"], False)
    assert timezone.now() - stored.last_seen < timezone.timedelta(seconds=5)


def test_only_the_newest_heartbeat_of_a_node_in_a_batch_counts(make_node, agent_settings, seen_resolution):
    node = make_node("hb")
    older = beat(node.hostname, users=("alice",))
    newer = beat(node.hostname, users=("bob",))
    taken = heartbeats.take([newer, older])  # out of order: two supervisors' pushes can cross
    assert (taken.stored, taken.superseded) == (1, 1)
    assert Node.objects.get(pk=node.pk).logged_in_users == ["bob"]


def test_hostile_messages_are_refused_with_the_reason_and_the_rest_of_the_batch_is_stored(
    make_node, agent_settings, seen_resolution, caplog
):
    node, other = make_node("hb"), make_node("hb")
    unaccepted = "hb-unknown"
    identity.enroll(unaccepted)  # a key of its own, never accepted
    forged = signing.decode(beat(other.hostname, users=("mallory",)), limit=10**6)
    forged["body"]["message"]["snapshot"]["users"] = ["eve"]  # changed after signing
    hostile = {
        "not JSON": b"\xff\xfe not json",
        "too large": b"{" + b" " * (70 * 1024) + b"}",
        "no envelope": b'{"hello": "world"}',
        "forged": signing.encode(forged),
        "about another node": beat(node.hostname, about=other.hostname, users=("mallory",)),
        "not a heartbeat": beat(other.hostname, kind="report", users=("mallory",)),
        "no accepted key": beat(unaccepted),
    }
    with caplog.at_level(logging.WARNING, logger="updates.heartbeats"):
        taken = heartbeats.take([*hostile.values(), beat(node.hostname, users=("carol",))])
    assert taken.stored == 1 and taken.refused == len(hostile)
    assert Node.objects.get(pk=node.pk).logged_in_users == ["carol"]
    assert Node.objects.get(pk=other.pk).logged_in_users == [], "nothing about the other node was stored"
    text = caplog.text
    for reason in ("not JSON", "at most 65536", "signed envelope", "does not match its key",
                   f"a heartbeat of {node.hostname} about {other.hostname}", "expected a 'node_report'",
                   f"{unaccepted} has no accepted key"):  # fmt: skip
        assert reason in text, reason


def test_the_consumer_keeps_going_while_the_broker_is_away_and_stops_when_told(caplog):
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # nothing listens on port 1
    calls = iter(range(3))
    with caplog.at_level(logging.WARNING, logger="updates.heartbeats"):
        total = heartbeats.consume(client, stop=lambda: next(calls, None) is None, linger=0.1)
    assert total.stored == 0
    assert caplog.text.count("the broker did not answer (ConnectionError)") == 1  # once, not each try


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--batch", "0"], "--batch must be between 1 and 10000, not 0"),
        (["--linger", "nan"], "--linger must be between 0 and 5 seconds, not nan"),
        (["--linger", "-1"], "--linger must be between 0 and 5 seconds, not -1.0"),
    ],
)
def test_manage_py_heartbeats_refuses_bad_arguments(args, error):
    command = [sys.executable, "manage.py", "heartbeats", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert error in done.stderr


@pytest.mark.django_db(transaction=True)
@pytest.mark.workflow
@pytest.mark.timeout(120)
def test_a_real_agents_heartbeats_reach_its_node_through_manage_py_heartbeats(
    make_node, agent_for, state_dir, redis_url
):
    from agent.drivers.simulated import SimulatedDriver

    node = make_node("hb")
    agent_for(node)  # its first report is in
    # A user logs on at the appliance; only the supervisor's next heartbeat can say so.
    SimulatedDriver(node.hostname, state_dir / node.hostname).log_on("dave")
    wait_for(lambda: "dave" in Node.objects.get(pk=node.pk).logged_in_users, 30, "the heartbeat with dave")
    # It came by the heartbeats list, which manage.py heartbeats keeps taking (the agent
    # sends every 0.5 s here; the consumer looks every 0.25 s).
    broker = redis.Redis.from_url(redis_url)
    wait_for(lambda: broker.llen(HEARTBEATS) == 0, 10, "the heartbeats list to be taken")
