"""Helpers shared by the management commands."""

from __future__ import annotations

import time

from django.core.management.base import CommandError, OutputWrapper

from updates.models import UpdateRun


def wait_for_run(run_id: int, timeout: float, stdout: OutputWrapper) -> None:
    """Follow a run until it ends; CommandError (exit 1) if it fails or outlasts timeout."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        run = UpdateRun.objects.get(pk=run_id)
        if run.current_step and run.current_step != last:
            last = run.current_step
            stdout.write(f"  {last}")
        if run.state == UpdateRun.State.SUCCEEDED:
            stdout.write(f"run {run_id} succeeded")
            return
        if run.state == UpdateRun.State.FAILED:
            raise CommandError(f"run {run_id} failed: {run.error}")
        time.sleep(0.5)
    raise CommandError(f"run {run_id} still {run.state} after {timeout:.0f} s")
