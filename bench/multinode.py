"""Many simulated nodes served by a few worker processes (benchmarks only).

A real node agent is a supervisor plus a Celery worker per node: 200 of them do
not fit on 2 cores. Here a few Celery workers (``--pool threads``) each consume the
queues ``node.<hostname>`` of many nodes, with the TimedDriver of
bench/rollout_driver.py. What that leaves out, on purpose:

- each worker serves the nodes of its share (TGP_AGENT_NODE lists them), and
  refuses a message for any other, as an agent does;
- no supervisor, so no heartbeats: each node's row is seeded as reported
  (``apply_snapshot``), and every step report carries a fresh snapshot anyway;
- no reboots: the benchmarks' release (built here) needs none, so its runs have
  no reboot step and verify only waits for the target version.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

from bench.common import enroll, spawn
from tgpadmin.processes import wait_for as wait

OLD, NEW = "2.1.0", "2.2.0"
PACKAGES = {
    OLD: {"tgpro-base": "2.1.0", "tgpro-browser": "2.1.0", "tgpro-vnc": "2.1.0"},
    NEW: {"tgpro-base": "2.1.0", "tgpro-browser": "2.2.0", "tgpro-vnc": "2.2.0"},
}
DRIVER = "bench.rollout_driver.TimedDriver"


def build_noreboot_repo(root: Path, package_bytes: int = 1024) -> tuple[Path, str]:
    """A signed repository with two stable releases that need no reboot; imported
    into the database. Returns (directory to serve, the root file to pin)."""
    from updates.demo import build_demo_package
    from updates.releases import import_index
    from updates.repository import build_repository, export_root

    for version, packages in PACKAGES.items():
        release_dir = root / "src" / "stable" / version
        release_dir.mkdir(parents=True)
        meta = {"notes": f"bench release {version}", "needs_reboot": False, "hotfix": False}
        (release_dir / "release.json").write_text(json.dumps(meta))
        for name, pkg_version in packages.items():
            data = build_demo_package(name, pkg_version, package_bytes=package_bytes)
            (release_dir / f"{name}_{pkg_version}.tar.gz").write_bytes(data)
    index = build_repository(root / "src", root / "out", root / "keys")
    export_root(root / "out", root / "root.json")
    import_index(index)
    return root / "out", str(root / "root.json")


def seed_nodes(hostnames: list[str], state_dir: Path, *, cluster: Any = None, durations: list[float] | None = None,
               users: tuple[str, ...] = ("alice",)) -> list[Any]:  # fmt: skip
    """Node rows plus their simulated appliances on OLD, reported once (as a
    heartbeat would), each with its install duration."""
    from bench.rollout_driver import TimedDriver
    from nodes.models import Node
    from updates.runs.snapshots import apply_snapshot

    Node.objects.bulk_create(Node(hostname=h, cluster=cluster) for h in hostnames)
    for i, hostname in enumerate(hostnames):
        driver = TimedDriver(hostname, state_dir / hostname)
        driver.seed(version=OLD, packages=PACKAGES[OLD], users=list(users), cluster=cluster is not None)
        driver.duration_file.write_text(repr(durations[i] if durations else 0.0))
        apply_snapshot(hostname, driver.snapshot())
    nodes = list(Node.objects.filter(hostname__in=hostnames).order_by("hostname"))
    enroll(nodes, state_dir)
    return nodes


def start_node_workers(hostnames: list[str], env: dict[str, str], log: Path, *, workers: int = 1,
                       concurrency: int = 20) -> list[Any]:  # fmt: skip
    """`workers` Celery workers, each consuming an equal share of the nodes' queues."""
    from tgpadmin.celery import app

    env = {**env, "TGP_NODE_DRIVER": DRIVER, "DATABASE_URL": "postgres://nobody@127.0.0.1:1/no-database-for-agents"}
    procs, names = [], []
    for k in range(workers):
        share = hostnames[k::workers]
        name = f"nodes{k}-{uuid.uuid4().hex[:6]}@bench"
        cmd = [sys.executable, "-m", "celery", "-A", "bench.node_app", "worker", "-n", name]
        cmd += ["-Q", ",".join(f"node.{h}" for h in share)]
        cmd += ["--pool", "threads", "--concurrency", str(concurrency), "--disable-prefetch"]
        cmd += ["--without-gossip", "--without-mingle", "-l", "WARNING"]
        procs.append(spawn(cmd, {**env, "TGP_AGENT_NODE": ",".join(share)}, log))
        names.append(name)
    wait(lambda: len(app.control.ping(destination=names, timeout=0.5)) == len(names), 90, "the node workers")
    return procs
