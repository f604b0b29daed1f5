"""Update locks: a failed run locks its node, and the node refuses every update
until a member of the group ``update`` removes the lock (kept as history)."""

from __future__ import annotations

from typing import Any

from django.utils import timezone

from nodes.models import Node
from updates.models import UpdateLock, UpdateRun


def active_lock(node: Node) -> UpdateLock | None:
    return UpdateLock.objects.active().filter(node=node).first()


def set_lock(node: Node, reason: str, run: UpdateRun | None = None) -> UpdateLock:
    existing = active_lock(node)
    if existing:
        return existing
    return UpdateLock.objects.create(node=node, reason=reason[:4000], run=run)


def remove_lock(node: Node, user: Any) -> bool:
    """Remove the node's active lock, keeping it as history. False if there was none."""
    return bool(
        UpdateLock.objects.active()
        .filter(node=node)
        .update(removed_at=timezone.now(), removed_by=user if getattr(user, "pk", None) else None)
    )
