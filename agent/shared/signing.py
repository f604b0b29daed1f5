"""Signed messages: Ed25519 over the canonical JSON of a message's body.

An envelope is ``{"body": {...}, "sig": "<base64>"}``. The body names its signer
(``"control"`` or a node's host name) and what it is about; who may sign what is
the receiver's rule (agent/tasks.py for commands, the control plane for reports),
checked after the signature. The canonical form is JSON with sorted keys and no
white space: what Celery's JSON serializer carries decodes to the same body, and
encodes again to the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.shared.env import ConfigError
from agent.shared.files import atomic_write
from agent.shared.protocol import ProtocolError


class BadSignature(ProtocolError):
    """The envelope is not signed by the key it must be signed by."""


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign(body: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    return {"body": body, "sig": base64.b64encode(key.sign(canonical(body))).decode()}


def encode(envelope: dict[str, Any]) -> bytes:
    """An envelope as it travels outside a Celery message (the heartbeats list): JSON, as
    Celery's serializer would carry it."""
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def decode(raw: bytes, *, limit: int) -> dict[str, Any]:
    """encode's envelope again, NOT yet verified; ProtocolError for anything else, or for
    more than `limit` bytes (refused unread)."""
    if len(raw) > limit:
        raise ProtocolError(f"a message of {len(raw)} bytes (at most {limit})")
    try:
        envelope = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("a message that is not JSON") from None
    body_of(envelope)
    return envelope  # type: ignore[no-any-return]


def body_of(envelope: Any) -> dict[str, Any]:
    """The body of an envelope, NOT yet verified: only to find out whose key checks it."""
    if not isinstance(envelope, dict) or set(envelope) != {"body", "sig"} or not isinstance(envelope["body"], dict):
        raise ProtocolError("expected a signed envelope {body, sig}")
    return envelope["body"]


def verify(envelope: Any, public: Ed25519PublicKey) -> dict[str, Any]:
    """The body, if `public` signed exactly it; BadSignature otherwise."""
    body = body_of(envelope)
    try:
        raw = base64.b64decode(envelope["sig"], validate=True)
        public.verify(raw, canonical(body))
    except (binascii.Error, ValueError, TypeError, InvalidSignature):
        raise BadSignature(f"the signature of this {body.get('kind', 'message')!r} does not match its key") from None
    return body


# --- keys --------------------------------------------------------------------------


def public_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def load_public(value: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError, AttributeError):
        raise BadSignature("not an Ed25519 public key (32 bytes, base64)") from None


def fingerprint(public_key_b64: str) -> str:
    """What an operator compares on the node and in the admin: SHA256 of the raw key, as ssh shows it."""
    digest = hashlib.sha256(load_public(public_key_b64).public_bytes_raw()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def pinned_key(value: str, path: Path, variable: str) -> str:
    """A public key a reader trusts: given inline (base64) in `variable`, else read from its file."""
    if value:
        return value
    try:
        return Path(path).read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"no pinned key: set {variable}, or {variable}_FILE ({path} does not exist)") from None


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise FileNotFoundError(f"no private key at {path}") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 key")
    return key


def create_private(path: Path) -> Ed25519PrivateKey:
    """A new key in a file of its own (0600); never over one that exists."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # FileExistsError: keep the key nodes trust
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    return key


def load_or_create_private(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The key at `path`, made there first if there is none; and whether it was made now."""
    try:
        return load_private(path), False
    except FileNotFoundError:
        try:
            return create_private(path), True
        except FileExistsError:  # made by another process meanwhile
            return load_private(path), False


def write_public(path: Path, key: Ed25519PrivateKey) -> str:
    value = public_b64(key)
    atomic_write(Path(path), (value + "\n").encode())
    return value
