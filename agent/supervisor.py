"""The node agent: a small supervisor around one Celery worker.

The worker consumes only ``node.<hostname>``. The supervisor outlives it: when
the worker exits for a (simulated) reboot, the supervisor gives the appliance a
new boot id and starts a new worker. Under honcho a process that exits stops
all the others, so the agent must not exit on its own reboot. The supervisor
also sends heartbeats (the node's snapshot) to the heartbeats list (agent.tasks.send_heartbeat).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import uuid
from typing import Any

from agent import identity
from agent.config import config
from agent.drivers.simulated import REBOOT_EXIT_CODE
from agent.shared import signing
from agent.shared.processes import die_with_parent
from agent.shared.protocol import node_queue
from agent.tasks import driver_for, request_enrollment, send_heartbeat, snapshot_of

log = logging.getLogger("agent")


class Supervisor:
    def __init__(self, hostname: str, *, loglevel: str = "INFO") -> None:
        self.hostname = hostname
        self.driver = driver_for(hostname)
        self.loglevel = loglevel
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.instance = ""

    def worker_command(self) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "agent.app", "worker",
            "-Q", node_queue(self.hostname), "-n", f"agent@{self.hostname}",
            # One step at a time, and nothing reserved ahead: the solo pool runs a task in
            # the consumer's own loop, so no message is fetched while a step runs, and a
            # worker that goes down (reboot, crash) cannot take the run's next message
            # with it. (--disable-prefetch would do the same on the threads pool, but
            # then polls: up to 1 s between two steps.)
            "--pool", "solo",
            "--without-gossip", "--without-mingle", "-E", "-l", self.loglevel,
        ]  # fmt: skip

    def start_worker(self) -> None:
        self.instance = uuid.uuid4().hex
        # Within the agent: the worker serves this node only, as this instance.
        env = {**os.environ, "TGP_AGENT_NODE": self.hostname, "TGP_AGENT_INSTANCE": self.instance}
        self.child = subprocess.Popen(self.worker_command(), env=env, preexec_fn=die_with_parent)
        log.info("agent %s: worker pid %s started (instance %s)", self.hostname, self.child.pid, self.instance[:8])

    def heartbeat(self) -> None:
        try:
            send_heartbeat(self.hostname, snapshot_of(self.driver, instance=self.instance))
        except Exception as exc:  # a broker outage must not kill the agent; it retries next beat
            log.warning("agent %s: heartbeat failed: %s", self.hostname, exc)

    def stop(self, *_: Any) -> None:
        self.stopping = True
        if self.child and self.child.poll() is None:
            self.child.terminate()

    def enroll(self) -> None:
        """The node's key (made now if it has none) is offered to the control plane at every
        start: an operator accepts it once on the node's page; offering it again changes nothing."""
        public, made = identity.enroll(self.hostname)
        what = "new key" if made else "key"
        log.info(
            "agent %s: %s %s (accepted on the node's admin page)", self.hostname, what, signing.fingerprint(public)
        )
        try:
            request_enrollment(self.hostname, public)
        except Exception as exc:  # the broker may be down: the next start offers it again
            log.warning("agent %s: could not offer the key: %s", self.hostname, exc)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.enroll()
        while not self.stopping:
            self.start_worker()
            code = self.supervise()
            if self.stopping:
                break
            if code == REBOOT_EXIT_CODE and hasattr(self.driver, "complete_reboot"):
                boot = self.driver.complete_reboot()
                log.warning("agent %s: rebooted, new boot id %s", self.hostname, boot[:8])
            else:
                log.error("agent %s: worker exited with %s, restarting", self.hostname, code)
        return 0

    def supervise(self) -> int:
        assert self.child is not None
        self.heartbeat()
        while True:
            try:
                return self.child.wait(timeout=config().heartbeat_interval)
            except subprocess.TimeoutExpired:
                self.heartbeat()
