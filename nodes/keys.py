"""Node keys: offered by a node's agent, accepted, replaced or revoked by an operator
(group ``update``), like Mender's device admission. Every key stays as history."""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from agent.shared import signing
from audit.records import Operation, record
from nodes.models import Node, NodeKey


class KeyRefused(Exception):
    """The key change cannot be made; the message says why, for the operator."""


def _user(user: Any) -> Any:
    return user if getattr(user, "pk", None) else None


def offer(node: Node, public_key: str) -> NodeKey | None:
    """A key the node's agent offers (it signed the offer with it). A key the node had
    before keeps its state (a revoked key stays revoked); a new one waits for an operator,
    in place of any key that waited before. None if nothing changed."""
    fingerprint = signing.fingerprint(public_key)
    if NodeKey.objects.filter(node=node, public_key=public_key).exists():
        return None
    with transaction.atomic():
        waiting = NodeKey.objects.pending().filter(node=node)
        rejected = list(waiting.values_list("fingerprint", flat=True))
        waiting.update(state=NodeKey.State.REJECTED, decided_at=timezone.now(), note="a newer key was offered")
        try:
            with transaction.atomic():
                key = NodeKey.objects.create(node=node, public_key=public_key, fingerprint=fingerprint)
        except IntegrityError:  # the same offer, processed twice at once
            return None
        # The node's own doing (its agent), in the trail for the enrollment's story.
        record(Operation.KEY_OFFERED, key, fingerprint=fingerprint, rejected=rejected)
        return key


def accept(key: NodeKey, user: Any, note: str = "") -> None:
    """Accept a waiting key; the node's accepted key before it is replaced (re-keying)."""
    with transaction.atomic():
        Node.objects.select_for_update().get(pk=key.node_id)  # one decision per node at a time
        now = timezone.now()
        if not NodeKey.objects.pending().filter(pk=key.pk).exists():
            raise KeyRefused(f"The key {key.fingerprint} of {key.node} is not waiting for a decision.")
        accepted = NodeKey.objects.accepted().filter(node_id=key.node_id)
        replaced = accepted.values_list("fingerprint", flat=True).first()
        accepted.update(
            state=NodeKey.State.REPLACED, decided_at=now, decided_by=_user(user), note=f"replaced by {key.fingerprint}"
        )
        NodeKey.objects.filter(pk=key.pk).update(
            state=NodeKey.State.ACCEPTED, decided_at=now, decided_by=_user(user), note=note[:200]
        )
        key.state = NodeKey.State.ACCEPTED  # as the row names it
        operation = Operation.KEY_REPLACED if replaced else Operation.KEY_ACCEPTED
        record(operation, key, user=user, fingerprint=key.fingerprint, replaced=replaced, note=note[:200])


def revoke(node: Node, user: Any, note: str = "") -> bool:
    """Distrust the node's accepted key: nothing the node says counts until another is accepted."""
    with transaction.atomic():
        key = NodeKey.objects.accepted().filter(node=node).select_related("node").first()
        if key is None:
            return False
        decision = {"decided_at": timezone.now(), "decided_by": _user(user), "note": note[:200]}
        # Conditional: of two revocations at once, one revokes (and is recorded).
        if not NodeKey.objects.accepted().filter(pk=key.pk).update(state=NodeKey.State.REVOKED, **decision):
            return False
        key.state = NodeKey.State.REVOKED  # as the row names it
        record(Operation.KEY_REVOKED, key, user=user, fingerprint=key.fingerprint, note=note[:200])
    return True


def enroll_accepted(node: Node, public_key: str, note: str) -> NodeKey:
    """Offer and accept at once: for the demo fleet and tests, which say so in `note`."""
    key = offer(node, public_key) or NodeKey.objects.get(node=node, public_key=public_key)
    if key.state == NodeKey.State.PENDING:
        accept(key, None, note)
        key.refresh_from_db()
    return key
