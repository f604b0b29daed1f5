"""`make test` runs in two pytest-xdist workers (README, Development): each worker has a
Redis database of its own on a shared Redis, and ports that a worker binds long after
choosing them cannot be taken by the other's connections meanwhile."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import worker_database
from tests.servers import free_port, lasting_port


def test_each_xdist_worker_gets_the_redis_database_after_the_urls():
    assert worker_database("redis://127.0.0.1:6379/13", "gw0") == "redis://127.0.0.1:6379/13"
    assert worker_database("redis://127.0.0.1:6379/13", "gw1") == "redis://127.0.0.1:6379/14"
    assert worker_database("redis://:secret@127.0.0.1:6379", "gw2") == "redis://:secret@127.0.0.1:6379/2"


def test_without_xdist_or_a_shared_redis_the_url_stays_as_it_is():
    assert worker_database("redis://127.0.0.1:6379/13", "") == "redis://127.0.0.1:6379/13"
    assert worker_database("", "gw1") == ""  # each worker starts its embedded Redis


def test_a_worker_beyond_redis_last_database_is_refused_with_the_reason():
    with pytest.raises(pytest.UsageError, match="database 16"):
        worker_database("redis://127.0.0.1:6379/13", "gw3")


def test_a_lasting_port_is_free_and_below_the_range_connections_draw_from():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    port = lasting_port()
    assert port < low and free_port() >= low
    with socket.create_server(("127.0.0.1", port)):
        pass
