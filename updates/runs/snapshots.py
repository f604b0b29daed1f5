"""What a node's agent says about its node (a snapshot), stored on the Node row:
the facts the control plane shows and decides on, never invented by it."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from nodes.models import Node

log = logging.getLogger(__name__)


def apply_snapshot(hostname: str, snapshot: dict[str, Any], seq: int = 0) -> Node | None:
    """Store what an agent says about its node. Returns the node, or None if unknown."""
    if not store_snapshot(hostname, snapshot, seq):
        return None
    return Node.objects.get(hostname=hostname)


def snapshot_fields(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The Node fields a snapshot sets, as stored."""
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
    return fields


# What a heartbeat is compared with: every field a snapshot sets, and when the node was last seen.
STORED_FIELDS = (*snapshot_fields({"worker": True}), "last_seen")


def store_heartbeat(hostname: str, stored: dict[str, Any] | None, snapshot: dict[str, Any], seq: int) -> bool:
    """A heartbeat that says what the node's row says already: True if it is handled
    here (nothing to store but that the node was seen), False if the caller must store
    it (store_snapshot). At 10,000 nodes nearly every heartbeat is such a one (issue 16:
    a full write each was the control plane's largest load):

    - last_seen younger than TGP_SEEN_RESOLUTION: no write at all. last_seen is
      therefore up to that old; its readers allow for it (the reconciler's cutoff,
      checked by tgpadmin.E001);
    - older: one narrow UPDATE (the snapshot is stored again, as it is, by its sequence).

    `stored`: the node's STORED_FIELDS. A worker's report is never handled here: it
    says the worker takes work, which a verify may wait for."""
    if stored is None or stored["last_seen"] is None or snapshot.get("worker"):
        return False
    if any(stored[name] != value for name, value in snapshot_fields(snapshot).items()):
        return False
    now = timezone.now()
    if now - stored["last_seen"] < timedelta(seconds=settings.TGP_SEEN_RESOLUTION):
        return True
    nodes = Node.objects.filter(hostname=hostname)
    newer = nodes.filter(report_seq__lt=seq) if seq else nodes.filter(report_seq=0)
    return bool(newer.update(reported_at=now, report_seq=seq, last_seen=now) or nodes.update(last_seen=now))


def store_snapshot(hostname: str, snapshot: dict[str, Any], seq: int = 0) -> bool:
    """apply_snapshot without reading the node back: False if the node is unknown.

    `seq` is the snapshot's place in the node's signed sequence (agent.identity): it is
    stored only if it is newer than the last one stored. The node's own clock decides
    nothing: a node an hour ahead does not make its later reports look old. A snapshot
    that is not newer still says that the node was seen. 0: no sequence (the demo's
    first look at its appliances), stored if nothing newer was."""
    fields = snapshot_fields(snapshot)
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
