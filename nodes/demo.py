"""The demo fleet: a single system gw1 and cluster1 of c1n1..c1n3, on simulated
appliances, with a signed demo repository. Every function is idempotent."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group

from agent.shared.files import atomic_write
from agent.shared.protocol import Snapshot
from nodes import keys
from nodes.models import Cluster, Node
from updates import trust
from updates.demo import DEMO_RELEASES, write_demo_sources
from updates.releases import import_index
from updates.repository import build_repository, export_root
from updates.runs.snapshots import apply_snapshot

START_VERSION = "2.1.0"
FLEET: dict[str, tuple[str | None, list[str]]] = {
    "gw1": (None, ["alice", "bob"]),
    "c1n1": ("cluster1", ["carol", "dave"]),
    "c1n2": ("cluster1", ["erin"]),
    "c1n3": ("cluster1", []),
}
DEMO_USERS = {"admin": None, "operator": "update", "maintainer": "maint"}


def build_demo_repository() -> int:
    """Publish the demo releases (all four roles' keys in TGP_REPO_KEYS_DIR, as only a
    demo has them), pin the root for the control plane and the demo's agents, and import
    the releases it just signed."""
    source = settings.VAR_DIR / "demo-src"
    write_demo_sources(source)
    index = build_repository(source, settings.TGP_REPO_DIR, settings.TGP_REPO_KEYS_DIR)
    if not settings.TGP_REPO_ROOT_FILE.exists():
        export_root(settings.TGP_REPO_DIR, settings.TGP_REPO_ROOT_FILE)
    import_index(index)
    return index.serial


def seed_nodes() -> list[Node]:
    cluster, _ = Cluster.objects.get_or_create(name="cluster1", defaults={"max_parallel_updates": 1})
    start_packages = next(pkgs for _, version, *_, pkgs in DEMO_RELEASES if version == START_VERSION)
    nodes = []
    for hostname, (cluster_name, users) in FLEET.items():
        node, _ = Node.objects.get_or_create(hostname=hostname, defaults={"cluster": cluster if cluster_name else None})
        args = ["--version", START_VERSION, "--packages", json.dumps(start_packages), "--users", ",".join(users)]
        snapshot = Snapshot.from_wire(agent_cli("simulate", hostname, *args, *(["--cluster"] if cluster_name else [])))
        # The demo runs on this machine: show the state before the agents first report.
        apply_snapshot(hostname, snapshot.to_wire())
        # Enrolled automatically, as no real fleet is: the key is made in the appliance's
        # state and accepted at once (its history says by whom).
        keys.enroll_accepted(node, agent_cli("enroll", hostname, "--json")["public_key"], "accepted by demo_fleet")
        nodes.append(node)
    seed_schedule(cluster)
    return nodes


def seed_schedule(cluster: Cluster) -> None:
    """The demo cluster's weekly time-controlled update, so that its plan shows on the
    cluster's and the schedule's pages from the start (Sundays 03:00)."""
    from updates.models import UpdateSchedule  # the updates app builds on this one

    if not UpdateSchedule.objects.filter(cluster=cluster).exists():
        UpdateSchedule.objects.create(name=f"{cluster} weekly", cluster=cluster, cron="0 3 * * 0")


def agent_cli(*args: str) -> Any:
    """`python -m agent ...` for a demo appliance, its JSON output: the control side never imports the agent."""
    env = {**os.environ, "TGP_NODE_STATE_DIR": str(settings.TGP_NODE_STATE_DIR), "TGP_NODE_DRIVER": "simulated"}
    done = subprocess.run(
        [sys.executable, "-m", "agent", *args], cwd=settings.BASE_DIR, env=env, capture_output=True, text=True,
        check=False, timeout=60,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"python -m agent {args[0]} {args[1]} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def publish_control_key() -> Path:
    """The control plane's public key where the demo agents look for it (TGP_CONTROL_PUBKEY_FILE)."""
    path = settings.VAR_DIR / "keys" / "control.pub"
    atomic_write(path, (trust.control_public_key() + "\n").encode())
    return path


def demo_password() -> str:
    path = settings.VAR_DIR / "demo-password"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(12))
        path.chmod(0o600)
    return path.read_text().strip()


def seed_users() -> dict[str, Any]:
    password = demo_password()
    User = get_user_model()
    for username, group in DEMO_USERS.items():
        user, created = User.objects.get_or_create(
            username=username, defaults={"is_staff": True, "is_superuser": group is None}
        )
        if created:
            user.set_password(password)
            user.save()
        if group:
            user.groups.add(Group.objects.get(name=group))
    return {"users": list(DEMO_USERS), "password": password}
