"""The step gap's baseline (issue 16): a bare Celery round trip on the same Redis in the
same run. One task on a node queue whose outcome is a task on the control queue, and
nothing else: no signature, no database, no report. Its gap is what Celery, kombu and
Redis cost between a task's end and the next task's start on this machine now; the
orchestration benchmark's step gaps are measured against it.

The two workers run as the real ones do: the node's with the solo pool (agent/supervisor.py),
the control's prefork with two processes, both prefetching one message.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Queue

NODE_Q, CONTROL_Q = "bench.rt.node", "bench.rt.control"
GAPS = "bench:rt:gaps"

app = Celery("roundtrip", fixups=[], set_as_current=False)
app.conf.update(
    broker_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_queues=[Queue(NODE_Q), Queue(CONTROL_Q)],
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.rt.node")
def node_step(i: int) -> None:
    """The node's step ends: its outcome goes to the control queue, stamped as it leaves."""
    control_step.apply_async((i, time.time()), queue=CONTROL_Q)


@app.task(name="bench.rt.control")
def control_step(i: int, sent: float) -> None:
    gap = time.time() - sent
    app.connection_for_write().default_channel.client.rpush(GAPS, f"{i}:{gap}")


def measure(work: Path, redis_url: str, rounds: int = 300) -> dict[str, Any]:
    """p50 and p99 (ms) of `rounds` round trips sent one after the other."""
    import redis

    from bench.common import percentile, spawn, stop_process
    from tgpadmin.processes import wait_for

    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    name = uuid.uuid4().hex[:6]
    base = [sys.executable, "-m", "celery", "-A", "bench.roundtrip", "worker", "--without-gossip", "--without-mingle"]
    workers = [
        spawn([*base, "-Q", NODE_Q, "-n", f"rt-node-{name}@bench", "--pool", "solo", "-l", "WARNING"], env,
              work / "roundtrip.log"),
        spawn([*base, "-Q", CONTROL_Q, "-n", f"rt-control-{name}@bench", "-c", "2", "-l", "WARNING"], env,
              work / "roundtrip.log"),
    ]  # fmt: skip
    client = redis.Redis.from_url(redis_url)
    client.delete(GAPS)
    sender = app.connection_for_write()
    try:
        # Warm up both workers (their first task imports and connects), then measure.
        for i in range(-5, rounds):
            done = client.llen(GAPS)
            node_step.apply_async((i,), queue=NODE_Q, connection=sender)
            wait_for(lambda d=done: client.llen(GAPS) > d, 60, f"round trip {i}", interval=0.001)
    finally:
        sender.release()
        for proc in workers:
            stop_process(proc)
    gaps = [float(v.split(b":")[1]) * 1000 for v in client.lrange(GAPS, 0, -1) if not v.startswith(b"-")]
    client.delete(GAPS)
    return {"rounds": len(gaps), "p50_ms": percentile(gaps, 50), "p99_ms": percentile(gaps, 99)}
