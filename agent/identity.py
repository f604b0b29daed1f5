"""The node's identity: its own key pair, made on the node and never leaving it,
and the sequence that orders everything it signs.

The private key lives in the node's state directory (``identity.key``, 0600). An
operator accepts its public key on the node's admin page (``python -m agent
enroll NODE`` prints it with its fingerprint); until then the control plane trusts
nothing the node says. The sequence is a counter in the same directory, shared by
the supervisor and the worker under a file lock: the control plane orders a node's
reports by it, not by the node's clock, and refuses one that is not newer.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.config import config
from agent.shared import signing
from agent.shared.files import atomic_write
from agent.shared.protocol import CONTROL_SIGNER

KEY_NAME = "identity.key"
SEQ_NAME = "report-seq"


def key_path(hostname: str) -> Path:
    return config().node_dir(hostname) / KEY_NAME


@functools.cache
def _key(path: Path) -> Ed25519PrivateKey:
    return signing.load_private(path)


def node_key(hostname: str) -> Ed25519PrivateKey:
    """The node's private key; FileNotFoundError (with what to do) if it was never enrolled."""
    path = key_path(hostname)
    try:
        return _key(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{hostname} has no key at {path}: run 'python -m agent enroll {hostname}'") from None


def enroll(hostname: str) -> tuple[str, bool]:
    """The node's public key (base64), made now if it has none; and whether it was made now."""
    key, made = signing.load_or_create_private(key_path(hostname))
    if made:
        _key.cache_clear()  # a new key (re-keying) signs from now on
    return signing.public_b64(key), made


def next_seq(hostname: str) -> int:
    """The next number of the node's sequence (1, 2, ...), never handed out twice,
    across the supervisor and its worker and across restarts."""
    fd = _seq_file(config().node_dir(hostname) / SEQ_NAME)
    # flock excludes the other process (supervisor or worker); threads of this one share
    # its open file, which flock does not tell apart: they take turns on a thread lock.
    with _seq_lock:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            text = os.pread(fd, _SEQ_WIDTH, 0).strip()
            seq = (int(text) if text.isdigit() else 0) + 1
            os.pwrite(fd, str(seq).rjust(_SEQ_WIDTH).encode(), 0)  # fixed width: no truncate
            return seq
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


_SEQ_WIDTH = 20
_seq_lock = threading.Lock()


@functools.cache
def _seq_file(path: Path) -> int:
    """Open once per process: every report is numbered, and opening a file each time costs more than the rest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def signed(hostname: str, kind: str, message: dict[str, Any]) -> dict[str, Any]:
    """A message of the node's, signed with its key and numbered in its sequence."""
    body = {"kind": kind, "signer": hostname, "seq": next_seq(hostname), "message": message}
    return signing.sign(body, node_key(hostname))


@functools.cache
def control_public_key() -> Ed25519PublicKey:
    """The control plane's key, pinned on the node like the repository's."""
    cfg = config()
    return signing.load_public(signing.pinned_key(cfg.control_pubkey, cfg.control_pubkey_file, "TGP_CONTROL_PUBKEY"))


def opened_command(envelope: Any, kind: str) -> dict[str, Any]:
    """The body of a command, if the control plane signed it; BadSignature otherwise."""
    body = signing.verify(envelope, control_public_key())
    if body.get("signer") != CONTROL_SIGNER or body.get("kind") != kind:
        raise signing.BadSignature(f"expected a {kind!r} command signed by the control plane")
    return body


# One line per command carried out, "<expires> <id as a JSON string>", appended: a step's hand-off to the
# next one remembers its command, and rewriting the whole record each time (read, filter,
# a temporary file, a rename) cost more than the rest of that hand-off's file work.
# Rewritten without the expired lines once it has grown past DONE_COMPACT_AT bytes.
DONE_NAME = "commands-done"
DONE_COMPACT_AT = 64 * 1024
LEGACY_DONE_NAME = "commands-done.json"  # the earlier record ({id: expires}), still read


def _done_file(hostname: str) -> Path:
    return config().node_dir(hostname) / DONE_NAME


def carried_out(hostname: str, command_id: str) -> bool:
    """Whether the node carried out this command already (a replay, to be refused)."""
    path = _done_file(hostname)
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    # A search, not a parse of every line (1,200 lines of json.loads: 3.9 ms a check).
    # A JSON string holds no raw newline and no unescaped quote, so ' "<id>"' followed by
    # the line's end is this id's complete line and nothing else (a line cut short has
    # no closing quote).
    found = f" {json.dumps(command_id)}\n" in f"{text}\n"
    return found or command_id in _read_legacy(path.with_name(LEGACY_DONE_NAME))


def remember(hostname: str, command_id: str, expires: float) -> None:
    """This command is done: refused from now on, until it expires (then its expiry refuses it)."""
    path = _done_file(hostname)
    # The newline goes first: a line a crash cut short never runs into the next one.
    line = f"\n{expires!r} {json.dumps(command_id)}".encode()
    # flock excludes the other processes of the node; threads of this one share the open
    # lock file, which flock does not tell apart: they take turns on a thread lock.
    with _done_lock:
        fd = _lock_file(path.with_suffix(".lock"))
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            legacy = path.with_name(LEGACY_DONE_NAME)
            if size < DONE_COMPACT_AT and not legacy.exists():
                # Not synced: every step writes it, and a sync is most of a step's hand-off here.
                # A power cut may forget the last ids; their commands still expire, and what is
                # disruptive is guarded once per run on the appliance (install and reboot markers).
                out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(out, line)  # one write of one short line: never interleaved
                finally:
                    os.close(out)
                return
            now = time.time()
            done = {**_read_legacy(legacy), **_read_done(path)}
            done[command_id] = expires
            kept = "".join(f"\n{until!r} {json.dumps(cid)}" for cid, until in done.items() if until > now)
            atomic_write(path, kept.encode(), durable=False)
            legacy.unlink(missing_ok=True)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


_done_lock = threading.Lock()


@functools.cache
def _lock_file(path: Path) -> int:
    """Open once per process, like the sequence's file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def _read_done(path: Path) -> dict[str, float]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    done: dict[str, float] = {}
    for line in text.splitlines():
        until, _, command_id = line.partition(" ")
        try:
            done[json.loads(command_id)] = float(until)
        except (ValueError, TypeError):  # a line cut short by a crash: its command was not done
            continue
    return done


def _read_legacy(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
