"""The control plane's side of the trusted channel: what it signs, and whose
signature it accepts for what.

- Every message to a node is a command signed with the control plane's key
  (``TGP_CONTROL_SIGNING_KEY_FILE``; the agents pin its public key), bound to the
  node, the run and step, an expiry and an id the node refuses to carry out twice.
- Every message from a node (report, heartbeat, a step's hand-off to the chain's
  next task, a key offer) is signed with that node's own key. It is accepted only
  if the node's key is accepted (``NodeKey``), and says nothing about any other
  node: the caller checks that a run it names is the node's own.
- A chain that starts at one of the control plane's own steps carries a "go"
  signed by the control plane: nothing but the control plane can start one.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings
from django.db.models import Exists, OuterRef, Value

from agent.shared import signing
from agent.shared.protocol import CONTROL_SIGNER, HOSTNAME_RE, ProtocolError, Snapshot
from nodes.models import NodeKey
from updates.models import UpdateRun, UpdateStep

log = logging.getLogger(__name__)


class Untrusted(ProtocolError):
    """A message the control plane does not accept; the text says why (for the log)."""


@functools.cache
def _key(path: Path) -> Ed25519PrivateKey:
    key, _ = signing.load_or_create_private(path)
    return key


def control_key() -> Ed25519PrivateKey:
    """The control plane's signing key, made on first use if there is none (the demo, tests)."""
    return _key(Path(settings.TGP_CONTROL_SIGNING_KEY_FILE))


def control_public_key() -> str:
    return signing.public_b64(control_key())


def command(kind: str, message: dict[str, Any], *, step: str = "") -> dict[str, Any]:
    """A command for a node, signed; it expires after TGP_COMMAND_TTL by the node's clock."""
    body: dict[str, Any] = {
        "kind": kind, "signer": CONTROL_SIGNER, "id": uuid.uuid4().hex,
        "expires": round(time.time() + settings.TGP_COMMAND_TTL, 3), "command": message,
    }  # fmt: skip
    if step:
        body["step"] = step
    return signing.sign(body, control_key())


def go(run_id: int, step: str) -> dict[str, Any]:
    """What starts a chain at one of the control plane's own steps (slot, hold, verify, complete)."""
    return signing.sign({"kind": "go", "signer": CONTROL_SIGNER, "run": run_id, "step": step}, control_key())


def from_node(
    envelope: Any, kind: str, *, node_fields: tuple[str, ...] = ()
) -> tuple[str, dict[str, Any], bool, dict[str, Any]]:
    """The node (host name) that signed a message of this kind, the message's body, whether the
    run the message names is the node's own (asked in the same query: every report
    needs it), and the node's `node_fields` as stored (in the same query: a heartbeat
    needs them to tell whether it changes anything); Untrusted if the node has no
    accepted key or the signature is not that key's."""
    signer, body = claimed_signer(envelope, kind)
    # One plain query on every message (a report is the control plane's most frequent work).
    keys = NodeKey.objects.filter(state=NodeKey.State.ACCEPTED, node__hostname=signer).order_by()
    message = body.get("message")
    run_id = message.get("run") if isinstance(message, dict) else None  # signed, as the check below proves
    if isinstance(run_id, int) and not isinstance(run_id, bool):
        keys = keys.annotate(
            owns_run=Exists(UpdateRun.objects.filter(pk=run_id, node_id=OuterRef("node_id")).order_by())
        )
    else:
        keys = keys.annotate(owns_run=Value(False))
    found = keys.values_list("public_key", "owns_run", *(f"node__{name}" for name in node_fields)).first()
    if found is None:
        raise Untrusted(f"{signer} has no accepted key: its {kind} is not trusted")
    signed_by(envelope, kind, signer, found[0])
    return signer, body, bool(found[1]), dict(zip(node_fields, found[2:], strict=True))


def claimed_signer(envelope: Any, kind: str) -> tuple[str, dict[str, Any]]:
    """Who says they signed a message of this kind, and its body: NOT yet verified."""
    body = signing.body_of(envelope)
    signer = body.get("signer")
    if body.get("kind") != kind or not isinstance(signer, str) or not HOSTNAME_RE.match(signer):
        raise Untrusted(f"expected a {kind!r} signed by a node")
    return signer, body


def accepted_keys(signers: Iterable[str], node_fields: tuple[str, ...] = ()) -> dict[str, tuple[str, dict[str, Any]]]:
    """from_node's query for many nodes at once (a batch of heartbeats): each node's
    accepted key and its `node_fields` as stored, by host name; a node without an accepted
    key is missing."""
    rows = (
        NodeKey.objects.filter(state=NodeKey.State.ACCEPTED, node__hostname__in=set(signers))
        .order_by()
        .values_list("node__hostname", "public_key", *(f"node__{name}" for name in node_fields))
    )
    return {row[0]: (row[1], dict(zip(node_fields, row[2:], strict=True))) for row in rows}


def signed_by(envelope: Any, kind: str, signer: str, public_key: str) -> None:
    """Untrusted unless `public_key` (the signer's accepted key) signed exactly this message,
    numbered in the signer's sequence."""
    signing.verify(envelope, _public(public_key))
    seq = envelope["body"].get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise Untrusted(f"a {kind} of {signer} without a sequence number")


@functools.lru_cache(maxsize=16384)
def _public(value: str) -> Ed25519PublicKey:
    # Parsed once per key, not once per message: a fleet's keys, a few hundred KiB.
    return signing.load_public(value)


def handoff(envelope: Any, step: str) -> tuple[int, str, dict[str, Any] | None]:
    """What a chain hands to the control step `step`: (run id, the node that handed it on
    or "" for the control plane itself, the node's snapshot). A node's hand-off says
    which of its steps it finished; the caller checks that the run is that node's and
    that the step is the one before `step`."""
    body = signing.body_of(envelope)
    if body.get("signer") == CONTROL_SIGNER:
        body = signing.verify(envelope, control_key().public_key())
        if body.get("kind") != "go" or body.get("step") != step or not isinstance(body.get("run"), int):
            raise Untrusted(f"a control plane message that does not start {step}")
        return body["run"], "", None
    node, body, _, _ = from_node(envelope, "done")
    message = body.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("run"), int):
        raise Untrusted(f"a hand-off of {node} that names no run")
    return message["run"], node, message


@dataclass(frozen=True)
class Handoff:
    run: int
    snapshot: dict[str, Any] | None
    seq: int


def accepted_handoff(envelope: Any, step: str) -> Handoff | None:
    """What the chain handed to the control step `step`, if it is genuine: a "go" of the
    control plane's, or the "done" of the step before `step` in the run's plan, signed
    by the run's own node. None (and a log line) otherwise: nothing is carried on."""
    try:
        run_id, signer, message = handoff(envelope, step)
        if not signer:
            return Handoff(run_id, None, 0)
        steps = UpdateStep.objects.filter(run_id=run_id, run__node__hostname=signer).order_by("position")
        names = [*steps.values_list("name", flat=True), "complete"]  # complete follows the run's last step
        if step not in names or names.index(step) == 0 or names[names.index(step) - 1] != (message or {}).get("step"):
            raise Untrusted(f"{signer} handed {step} of run {run_id} on, which is not its own next step")
        raw = (message or {}).get("snapshot")
        snapshot = Snapshot.from_wire(raw).to_wire() if raw is not None else None
        return Handoff(run_id, snapshot, signing.body_of(envelope)["seq"])
    except ProtocolError as exc:
        log.warning("refused a hand-off to %s: %s", step, exc)
        return None


def offered_key(envelope: Any) -> tuple[str, str]:
    """(host name, public key) of a node's key offer, signed with that very key (the node holds it)."""
    body = signing.body_of(envelope)
    message = body.get("message")
    if body.get("kind") != "enroll" or not isinstance(message, dict):
        raise Untrusted("expected a key offer")
    hostname, public_key = message.get("hostname"), message.get("public_key")
    if not isinstance(hostname, str) or not HOSTNAME_RE.match(hostname) or body.get("signer") != hostname:
        raise Untrusted("a key offer that does not name its node")
    signing.verify(envelope, signing.load_public(str(public_key)))
    return hostname, str(public_key)
