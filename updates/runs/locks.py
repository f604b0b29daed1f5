"""Update locks: a failed run locks its node, and the node refuses every update
until a member of the group ``update`` removes the lock (kept as history)."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from audit.records import Operation, record
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
    """Remove the node's active lock, keeping it as history (and in the audit trail).
    False if there was none."""
    with transaction.atomic():
        lock = UpdateLock.objects.active().filter(node=node).select_related("node").first()
        if lock is None:
            return False
        by = user if getattr(user, "pk", None) else None
        # Conditional: of two removals at once, one removes it (and is recorded).
        if not UpdateLock.objects.active().filter(pk=lock.pk).update(removed_at=timezone.now(), removed_by=by):
            return False
        record(Operation.REMOVE_LOCK, lock, user=user, run=lock.run_id)  # its reason stays on the lock
    return True
