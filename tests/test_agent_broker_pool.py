"""An agent worker that serves many nodes (a benchmark's simulated fleet) checks their
fences at one instant: every check gets a connection, none fails for the pool's cap.
(fleet-update at 2,500 nodes: 441 drains failed with "MaxConnectionsError: Too many
connections" while redis-py 8 capped the shared pool at 100.)"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
import redis

from agent import steps
from agent.shared.processes import die_with_parent
from agent.shared.protocol import slot_keys
from tests.servers import free_port
from tgpadmin import embedded_redis
from tgpadmin.processes import stop_process

NODES = 150  # more than redis-py's default cap of 100 connections


@pytest.fixture
def own_redis(tmp_path: Path):
    # A server of its own: the test pauses every client of it.
    port = free_port()
    proc = subprocess.Popen(
        embedded_redis.command(port, tmp_path, persist=False),
        stdout=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
    )  # fmt: skip
    try:
        embedded_redis.wait_until_up(port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc)


def test_a_worker_serving_150_nodes_checks_all_their_fences_at_once(own_redis, agent_settings):
    nodes = tuple(f"sim{i}" for i in range(NODES))
    agent_settings(redis_url=own_redis, served=nodes)
    admin = redis.Redis.from_url(own_redis)
    holders = slot_keys("c1")[0]
    admin.hset(holders, mapping={node: "1:0" for node in nodes})
    # Every check waits on the paused server holding its connection, as when a whole
    # fleet's drains come due at the same second.
    admin.client_pause(1500)
    answers, errors = [], []

    def check(node: str) -> None:
        try:
            answers.append(steps.broker().hget(holders, node))
        except redis.RedisError as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=check, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert answers == [b"1:0"] * NODES
