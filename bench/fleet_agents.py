"""Many simulated agents in one process, for the fleet benchmark (bench/fleet.py).

Each node has its own identity (an Ed25519 key the control plane accepted) and its
own signed, numbered heartbeats, sent the way an agent's supervisor sends them
(agent.tasks.send_heartbeat: one RPUSH onto the heartbeats list, through the agent's
own broker client) at the production interval, spread evenly over it. What is left out is
what costs an agent process per node: a Celery worker and a driver. A heartbeat's
sequence number is its send time (in microseconds), so that the benchmark can tell
from the database how long each one that was written took to get there.

    python -m bench.fleet_agents KEYS --interval 15 [--until EPOCH] --out STATS.json

Runs until --until or SIGTERM, then writes what it sent.

KEYS: JSON lines [hostname, raw private key in base64]. Some heartbeats carry a
change (a user logs on or off, --change is the share): most carry none, as in a
real fleet.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import steps  # noqa: E402 - after the path
from agent.shared import signing  # noqa: E402
from agent.shared.protocol import HEARTBEATS, NodeReport, Snapshot  # noqa: E402
from bench.common import percentile  # noqa: E402

PACKAGES = {"tightgate-base": "2.1.0", "tightgate-browser": "2.1.0"}


class SimNode:
    def __init__(self, hostname: str, key: Ed25519PrivateKey) -> None:
        self.hostname, self.key, self.seq = hostname, key, 0
        self.users = ["alice"]
        self.boot = f"boot-{hostname}"
        self.instance = f"agent-{hostname}"

    def heartbeat(self, change: bool) -> dict[str, Any]:
        if change:
            self.users = ["alice"] if len(self.users) > 1 else ["alice", "bob"]
        # The sequence is the send time in microseconds: increasing, as an agent's counter
        # is, and the benchmark reads from the database when each stored one was sent.
        self.seq = max(self.seq + 1, int(time.time() * 1e6))
        state = {
            "installed_version": "2.1.0", "packages": PACKAGES, "users": self.users, "logon_enabled": True,
            "boot_id": self.boot, "agent_instance": self.instance, "worker": False, "taken_at": time.time(),
        }  # fmt: skip
        snapshot = Snapshot.from_wire({**Snapshot().to_wire(), **state})
        body = {"kind": "node_report", "signer": self.hostname, "seq": self.seq,
                "message": NodeReport(self.hostname, snapshot).to_wire()}  # fmt: skip
        return signing.sign(body, self.key)


def send(node: SimNode, envelope: dict[str, Any]) -> None:
    # As agent.tasks.send_heartbeat.
    steps.broker().rpush(HEARTBEATS, signing.encode(envelope))


def load(path: Path) -> list[SimNode]:
    nodes = []
    for line in path.read_text().splitlines():
        hostname, raw = json.loads(line)
        nodes.append(SimNode(hostname, Ed25519PrivateKey.from_private_bytes(base64.b64decode(raw))))
    return nodes


STOPPING = False


def stop(*_: Any) -> None:
    global STOPPING
    STOPPING = True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("keys", type=Path)
    parser.add_argument("--interval", type=float, default=15.0)
    parser.add_argument("--until", type=float, default=float("inf"), help="stop at this time (epoch seconds)")
    parser.add_argument("--change", type=float, default=0.02)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    nodes = load(args.keys)
    signal.signal(signal.SIGTERM, stop)
    rng = random.Random(len(nodes))
    start = time.time()
    late: list[float] = []
    sent, k = 0, 0
    while True:
        # Node k of n is due at start + (k/n) * interval in each round: evenly spread.
        due = start + k / len(nodes) * args.interval
        if due >= args.until:
            break
        while not STOPPING and due > time.time():
            time.sleep(max(0.0, min(0.2, due - time.time())))  # short: a SIGTERM ends the run within 0.2 s
        if STOPPING:
            break
        node = nodes[k % len(nodes)]
        send(node, node.heartbeat(rng.random() < args.change))
        late.append(time.time() - due)
        sent, k = sent + 1, k + 1
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats = {
        "nodes": len(nodes), "sent": sent, "seconds": round(time.time() - start, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "late_p50_ms": round(percentile(late, 50) * 1e3, 1), "late_p99_ms": round(percentile(late, 99) * 1e3, 1),
    }  # fmt: skip
    args.out.write_text(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
