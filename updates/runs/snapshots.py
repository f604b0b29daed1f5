"""What a node's agent says about its node (a snapshot), stored on the Node row:
the facts the control plane shows and decides on, never invented by it."""

from __future__ import annotations

import logging
from typing import Any

from django.utils import timezone

from nodes.models import Node

log = logging.getLogger(__name__)


def apply_snapshot(hostname: str, snapshot: dict[str, Any], seq: int = 0) -> Node | None:
    """Store what an agent says about its node. Returns the node, or None if unknown."""
    if not store_snapshot(hostname, snapshot, seq):
        return None
    return Node.objects.get(hostname=hostname)


def store_snapshot(hostname: str, snapshot: dict[str, Any], seq: int = 0) -> bool:
    """apply_snapshot without reading the node back: False if the node is unknown.

    `seq` is the snapshot's place in the node's signed sequence (agent.identity): it is
    stored only if it is newer than the last one stored. The node's own clock decides
    nothing: a node an hour ahead does not make its later reports look old. A snapshot
    that is not newer still says that the node was seen. 0: no sequence (the demo's
    first look at its appliances), stored if nothing newer was."""
    fields = {
        "installed_version": str(snapshot.get("installed_version", "")),
        "installed_packages": dict(snapshot.get("packages", {})),
        "logged_in_users": sorted(snapshot.get("users", [])),
        "logon_enabled": bool(snapshot.get("logon_enabled", True)),
        "in_load_balancer": bool(snapshot.get("in_load_balancer", False)),
        "reported_maintenance": bool(snapshot["maintenance"]) if "maintenance" in snapshot else None,
        "boot_id": str(snapshot.get("boot_id", "")),
        "agent_instance": str(snapshot.get("agent_instance", "")),
    }
    if snapshot.get("worker"):
        fields["worker_instance"] = fields["agent_instance"]
    now = timezone.now()
    nodes = Node.objects.filter(hostname=hostname)
    newer = nodes.filter(report_seq__lt=seq) if seq else nodes.filter(report_seq=0)
    if newer.update(**fields, reported_at=now, report_seq=seq, last_seen=now):
        return True
    # An older snapshot processed late: the node was still seen. A worker's report
    # still says that its worker is up, if it is the node's current agent: a heartbeat
    # taken just after it may have been processed first (two control processes).
    if "worker_instance" in fields:
        nodes.filter(agent_instance=fields["agent_instance"]).update(worker_instance=fields["worker_instance"])
    if nodes.update(last_seen=now):
        return True
    log.warning("report from unknown node %r ignored", hostname)
    return False


def store_run_snapshot(run_id: int, snapshot: dict[str, Any] | None, seq: int = 0) -> None:
    """A snapshot a chain handed on (signed by the run's node, seq its place), stored for the run's node."""
    if snapshot:
        hostname = Node.objects.filter(runs__pk=run_id).values_list("hostname", flat=True).first()
        if hostname:
            store_snapshot(hostname, snapshot, seq)
