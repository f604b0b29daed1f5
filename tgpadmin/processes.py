"""Small helpers for the processes tgpadmin starts: the node agent's worker, and
the workers, servers and agents that tests and benchmarks start."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from agent.shared.processes import die_with_parent

__all__ = ["die_with_parent", "stop_process", "stop_processes", "wait_for"]


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM the process group (started with start_new_session=True), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def stop_processes(procs: list[subprocess.Popen[Any]], timeout: float = 15.0) -> None:
    """stop_process for many at once: all are told first, then waited for, so that N
    processes that each take a few seconds to shut down take a few seconds, not N times that."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wait_for(
    predicate: Callable[[], Any], timeout: float = 30.0, what: str = "the condition", interval: float = 0.05
) -> Any:
    """Poll until predicate() is truthy; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
