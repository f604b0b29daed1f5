"""A simulated appliance whose disruptive work takes a set time (benchmarks only).

Selected with TGP_NODE_DRIVER=bench.rollout_driver.TimedDriver. The benchmark
writes the node's duration in seconds to <state dir>/duration; ``install``
sleeps that long before it unpacks, everything else is as fast as the
SimulatedDriver is without TGP_SIM_STEP_SECONDS. It also notes the node-side
time of each call in <state dir>/events.jsonl: the database only has the control
worker's receive times. Several simulated nodes share
one worker process (bench/multinode.py), so this driver must never take the
process down: it does not simulate reboots (the benchmarks use a release that
needs none).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.drivers.simulated import SimulatedDriver
from agent.shared.repository import PackageEntry


class TimedDriver(SimulatedDriver):
    simulates_reboot = False  # a "reboot" would exit the worker that serves every node

    @property
    def duration_file(self) -> Path:
        return self.state_dir / "duration"

    def duration(self) -> float:
        try:
            return float(self.duration_file.read_text())
        except FileNotFoundError:
            return 0.0

    def note(self, event: str) -> None:
        with open(self.state_dir / "events.jsonl", "a") as fh:
            fh.write(json.dumps({"event": event, "t": time.time()}) + "\n")

    def events(self) -> dict[str, float]:
        """The first time of each event (a redelivered step notes it again)."""
        found: dict[str, float] = {}
        path = self.state_dir / "events.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            item = json.loads(line)
            found.setdefault(item["event"], item["t"])
        return found

    def notify(self, notice_id: str, message: str) -> int:
        self.note("notify")
        return super().notify(notice_id, message)

    def exclude(self) -> None:
        self.note("exclude")  # the scheduled path: out of the load balancer, users stay for the lead time
        super().exclude()

    def drain(self, run_id: int) -> list[str]:
        self.note("drain")
        return super().drain(run_id)

    def install(self, run_id: int, version: str, files: list[tuple[PackageEntry, Path]], full: bool) -> str:
        if str(run_id) in self.read().get("installs", {}):
            return f"already installed by run {run_id}"  # a redelivery does not wait again
        self.note("install")
        seconds = self.duration()
        time.sleep(seconds)
        done = super().install(run_id, version, files, full)
        self.note("install_end")
        return f"{done} after {seconds:.3f} s"

    def resume(self) -> None:
        super().resume()
        self.note("resume_end")
