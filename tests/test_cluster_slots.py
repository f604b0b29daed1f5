"""The cluster cap as a counting semaphore, against the session's real Redis."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis

from updates.slots import ClusterSlots, SlotHolder, slots_for_url

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    name = f"test:slots:{uuid.uuid4().hex}"
    yield name
    for key in client.scan_iter(f"{name}:*"):
        client.delete(key)


@pytest.fixture
def slots(client: redis.Redis, prefix: str) -> ClusterSlots:
    return ClusterSlots(client, prefix=prefix)


def test_cap_is_respected(slots: ClusterSlots) -> None:
    assert slots.acquire("c1", "gw1", 2) is not None
    assert slots.acquire("c1", "gw2", 2) is not None
    assert slots.acquire("c1", "gw3", 2) is None
    assert [h.node for h in slots.holders("c1")] == ["gw1", "gw2"]


def test_clusters_have_separate_slots(slots: ClusterSlots) -> None:
    assert slots.acquire("c1", "gw1", 1) is not None
    assert slots.acquire("c2", "gw2", 1) is not None
    assert slots.acquire("c1", "gw3", 1) is None


def test_reentrant_acquire_returns_the_same_token_and_takes_no_second_slot(slots: ClusterSlots) -> None:
    token = slots.acquire("c1", "gw1", 2)
    assert slots.acquire("c1", "gw1", 2) == token
    assert slots.acquire("c1", "gw1", 2) == token
    assert slots.acquire("c1", "gw2", 2) is not None
    assert len(slots.holders("c1")) == 2


def test_reentrant_acquire_succeeds_even_when_the_cluster_is_full(slots: ClusterSlots) -> None:
    token = slots.acquire("c1", "gw1", 1)
    assert slots.acquire("c1", "gw2", 1) is None
    assert slots.acquire("c1", "gw1", 1) == token


def test_tokens_strictly_increase_per_cluster(slots: ClusterSlots) -> None:
    tokens = []
    for i in range(10):
        token = slots.acquire("c1", f"gw{i}", 1)
        assert token is not None
        tokens.append(token)
        assert slots.release("c1", f"gw{i}", token)
    # The same node again gets a new, larger token after releasing.
    again = slots.acquire("c1", "gw0", 1)
    assert again is not None
    tokens.append(again)
    assert tokens == sorted(set(tokens))


def test_release_frees_the_slot(slots: ClusterSlots) -> None:
    slots.acquire("c1", "gw1", 1)
    assert slots.release("c1", "gw1")
    assert not slots.release("c1", "gw1")
    assert slots.acquire("c1", "gw2", 1) is not None


def test_release_of_a_non_holder_does_nothing(slots: ClusterSlots) -> None:
    slots.acquire("c1", "gw1", 1)
    assert not slots.release("c1", "gw2")
    assert [h.node for h in slots.holders("c1")] == ["gw1"]


def test_release_with_a_stale_token_does_not_free_the_newer_slot(slots: ClusterSlots) -> None:
    old = slots.acquire("c1", "gw1", 1)
    assert old is not None
    # An operator frees the slot of a run believed dead; a new run of the node takes it.
    assert slots.force_release("c1", "gw1")
    new = slots.acquire("c1", "gw1", 1)
    assert new is not None and new > old
    assert not slots.release("c1", "gw1", old)
    assert slots.check("c1", "gw1", new)
    assert slots.release("c1", "gw1", new)
    assert slots.holders("c1") == []


def test_check_is_the_fencing_test(slots: ClusterSlots) -> None:
    token = slots.acquire("c1", "gw1", 1)
    assert token is not None
    assert slots.check("c1", "gw1", token)
    assert not slots.check("c1", "gw1", token + 1)
    assert not slots.check("c1", "gw1", token - 1)
    assert not slots.check("c1", "gw2", token)
    assert not slots.check("c2", "gw1", token)
    slots.release("c1", "gw1", token)
    assert not slots.check("c1", "gw1", token)


def test_holders_carry_token_and_since_sorted_by_since(slots: ClusterSlots, client: redis.Redis) -> None:
    before = datetime.now(UTC)
    first = slots.acquire("c1", "zz-first", 3)
    # Wait for Redis' clock to move on (bounded) so the two are ordered by time, not by chance.
    deadline = time.monotonic() + 2
    start = client.time()
    while client.time() == start and time.monotonic() < deadline:
        pass
    second = slots.acquire("c1", "aa-second", 3)
    after = datetime.now(UTC)
    holders = slots.holders("c1")
    assert [(h.node, h.token) for h in holders] == [("zz-first", first), ("aa-second", second)]
    assert all(isinstance(h, SlotHolder) for h in holders)
    for h in holders:
        assert h.since.tzinfo is not None and h.since.utcoffset() == timedelta(0)
        # Redis' clock and ours are the same machine's; allow for rounding to ms.
        assert before - timedelta(seconds=1) <= h.since <= after + timedelta(seconds=1)
    assert holders[0].since <= holders[1].since
    with pytest.raises(AttributeError):
        holders[0].token = 99  # type: ignore[misc]


def test_force_release(slots: ClusterSlots) -> None:
    token = slots.acquire("c1", "gw1", 1)
    assert token is not None
    assert slots.acquire("c1", "gw2", 1) is None
    assert slots.force_release("c1", "gw1")
    assert not slots.force_release("c1", "gw1")
    assert not slots.check("c1", "gw1", token)
    assert slots.acquire("c1", "gw2", 1) is not None


def test_lowered_cap_lets_holders_keep_their_slots_and_admits_nobody_new(slots: ClusterSlots) -> None:
    a = slots.acquire("c1", "gw1", 3)
    slots.acquire("c1", "gw2", 3)
    slots.acquire("c1", "gw3", 3)
    assert slots.acquire("c1", "gw1", 1) == a
    assert slots.acquire("c1", "gw4", 2) is None
    slots.release("c1", "gw2")
    assert slots.acquire("c1", "gw4", 2) is None  # still two holders
    slots.release("c1", "gw3")
    assert slots.acquire("c1", "gw4", 2) is not None


@pytest.mark.parametrize("cap", [0, -1, 1.5, True, "2"])
def test_cap_must_be_a_positive_integer(slots: ClusterSlots, cap: object) -> None:
    with pytest.raises(ValueError):
        slots.acquire("c1", "gw1", cap)  # type: ignore[arg-type]
    assert slots.holders("c1") == []


def test_empty_names_are_refused(slots: ClusterSlots) -> None:
    with pytest.raises(ValueError):
        slots.acquire("", "gw1", 1)
    with pytest.raises(ValueError):
        slots.acquire("c1", "", 1)


def test_slots_for_url_and_decoded_clients_see_the_same_slots(redis_url: str, prefix: str) -> None:
    plain = slots_for_url(redis_url)
    plain.prefix = prefix
    decoded = ClusterSlots(redis.Redis.from_url(redis_url, decode_responses=True), prefix=prefix)
    token = plain.acquire("c1", "gw1", 1)
    assert token is not None
    assert decoded.acquire("c1", "gw1", 1) == token
    assert decoded.check("c1", "gw1", token)
    assert [h.node for h in decoded.holders("c1")] == ["gw1"]
    assert decoded.release("c1", "gw1", token)


def test_scripts_survive_a_script_flush(slots: ClusterSlots, client: redis.Redis) -> None:
    # A Redis restart (or SCRIPT FLUSH) forgets loaded scripts; redis-py reloads them.
    client.script_flush()
    token = slots.acquire("c1", "gw1", 1)
    assert token is not None
    client.script_flush()
    assert slots.release("c1", "gw1", token)


# --- concurrency ------------------------------------------------------------------

CAP = 3
WORKERS = 8
CYCLES = 25


class Occupancy:
    """Counts the holders inside the critical section, as the holders themselves see it."""

    def __init__(self, lock: threading.Lock | None = None) -> None:
        self.lock = lock or threading.Lock()
        self.current = 0
        self.peak = 0

    def enter(self) -> None:
        with self.lock:
            self.current += 1
            self.peak = max(self.peak, self.current)

    def leave(self) -> None:
        with self.lock:
            self.current -= 1


def _cycle(slots: ClusterSlots, cluster: str, node: str, rng: random.Random, enter, leave, deadline: float) -> None:
    """Wait for a slot (bounded), hold it a little, give it back."""
    while (token := slots.acquire(cluster, node, CAP)) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{node} never got a slot")
        time.sleep(rng.uniform(0, 0.002))  # back-off between polls, not synchronisation
    enter()
    try:
        assert slots.check(cluster, node, token)
        time.sleep(rng.uniform(0, 0.003))
        assert slots.check(cluster, node, token)
    finally:
        leave()
        assert slots.release(cluster, node, token)


def test_threads_never_exceed_the_cap(redis_url: str, prefix: str) -> None:
    occupancy = Occupancy()
    errors: list[BaseException] = []
    start = threading.Barrier(WORKERS, timeout=10)
    deadline = time.monotonic() + 40

    def work(i: int) -> None:
        # Each worker its own client, like separate Celery processes would have.
        slots = ClusterSlots(redis.Redis.from_url(redis_url), prefix=prefix)
        rng = random.Random(i)
        try:
            start.wait()
            for _ in range(CYCLES):
                _cycle(slots, "c1", f"gw{i}", rng, occupancy.enter, occupancy.leave, deadline)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.1, deadline + 5 - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "workers did not finish in time"
    assert not errors, errors
    assert occupancy.peak <= CAP
    # The test has teeth only if the workers really competed for the slots.
    assert occupancy.peak == CAP
    assert occupancy.current == 0


def _process_worker(redis_url: str, prefix: str, i: int, current, peak, lock, start, deadline: float) -> None:
    def enter() -> None:
        with lock:
            current.value += 1
            peak.value = max(peak.value, current.value)

    def leave() -> None:
        with lock:
            current.value -= 1

    slots = ClusterSlots(redis.Redis.from_url(redis_url), prefix=prefix)
    rng = random.Random(100 + i)
    start.wait()
    for _ in range(CYCLES):
        _cycle(slots, "c1", f"gw{i}", rng, enter, leave, deadline)


def test_processes_never_exceed_the_cap(redis_url: str, prefix: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    lock = ctx.Lock()
    current = ctx.Value("i", 0, lock=False)
    peak = ctx.Value("i", 0, lock=False)
    start = ctx.Barrier(WORKERS, timeout=30)
    # time.monotonic() is system-wide on Linux, so one deadline serves every process.
    deadline = time.monotonic() + 45
    procs = [
        ctx.Process(target=_process_worker, args=(redis_url, prefix, i, current, peak, lock, start, deadline))
        for i in range(WORKERS)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=max(0.1, deadline + 5 - time.monotonic()))
        assert not any(p.is_alive() for p in procs), "workers did not finish in time"
        assert [p.exitcode for p in procs] == [0] * WORKERS
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    assert 0 < peak.value <= CAP
    assert current.value == 0
