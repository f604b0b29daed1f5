"""Heartbeats in batches (issue 16): what `manage.py heartbeats` runs.

A node's supervisor pushes its signed heartbeat onto the ``heartbeats`` Redis list
(agent.tasks.send_heartbeat). Here they are taken a batch at a time: each is checked
exactly as control.node_report checks one (signed by the node's accepted key, about
the node itself, numbered in its sequence), but the batch's keys and stored state
come in one query, and the heartbeats that change nothing are stored in one
transaction. As a Celery task each, a heartbeat cost the control worker's consumer
more than its own work, and the control host kept up with about 2,500 nodes.

Nothing a heartbeat carries is lost by taking it late or not at all: it is the node's
state, and the next one (TGP_HEARTBEAT_INTERVAL later) says it again. So a batch is
taken off the list before it is handled, and one that fails (the database went away)
is logged and dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from django.db import DatabaseError, close_old_connections, transaction

from agent.shared import signing
from agent.shared.protocol import HEARTBEAT_MAX_BYTES, HEARTBEATS, NodeReport, ProtocolError
from updates import trust
from updates.runs import recovery
from updates.runs.snapshots import STORED_FIELDS, store_heartbeat

log = logging.getLogger(__name__)

BATCH = 500  # heartbeats taken at once: at 10,000 nodes a batch is under a second of them
LINGER = 0.25  # seconds between looks at a list that was not full: the most a heartbeat waits for its batch
KIND = "node_report"


@dataclass
class Taken:
    """What a batch came to, for the log line and the tests."""

    stored: int = 0  # heartbeats accepted (written, or seen again within TGP_SEEN_RESOLUTION)
    superseded: int = 0  # accepted, but the same node's newer one in the batch is what counts
    refused: int = 0  # each logged with its reason; a count only, so that a long run keeps no list

    def add(self, other: Taken) -> None:
        self.stored += other.stored
        self.superseded += other.superseded
        self.refused += other.refused


@dataclass(frozen=True)
class _Heartbeat:
    node: str
    seq: int
    snapshot: dict[str, Any]
    stored: dict[str, Any]


def take(messages: Sequence[bytes]) -> Taken:
    """Check and store a batch of heartbeats as they came off the list. A message that is
    not a genuine heartbeat of an accepted node about itself is refused with a log line
    and changes nothing; the rest of the batch is stored."""
    taken = Taken()
    claimed: list[tuple[str, dict[str, Any]]] = []
    for raw in messages:
        try:
            envelope = signing.decode(raw, limit=HEARTBEAT_MAX_BYTES)
            claimed.append((trust.claimed_signer(envelope, KIND)[0], envelope))
        except ProtocolError as exc:
            _refuse(taken, exc)
    keys = trust.accepted_keys({signer for signer, _ in claimed}, STORED_FIELDS) if claimed else {}
    newest: dict[str, _Heartbeat] = {}
    for signer, envelope in claimed:
        try:
            beat = _checked(signer, envelope, keys.get(signer))
        except ProtocolError as exc:
            _refuse(taken, exc)
            continue
        # Only the newest of a node's heartbeats in the batch says how it is now.
        if signer in newest:
            taken.superseded += 1
            if newest[signer].seq > beat.seq:
                continue
        newest[signer] = beat
    _store(list(newest.values()))
    taken.stored = len(newest)
    return taken


def _refuse(taken: Taken, reason: ProtocolError) -> None:
    log.warning("refused a heartbeat: %s", reason)
    taken.refused += 1


def _checked(signer: str, envelope: dict[str, Any], key: tuple[str, dict[str, Any]] | None) -> _Heartbeat:
    if key is None:
        raise trust.Untrusted(f"{signer} has no accepted key: its {KIND} is not trusted")
    trust.signed_by(envelope, KIND, signer, key[0])
    body = envelope["body"]
    report = NodeReport.from_wire(body.get("message"))
    if report.hostname != signer:  # a node speaks for itself only
        raise trust.Untrusted(f"a heartbeat of {signer} about {report.hostname}")
    return _Heartbeat(signer, body["seq"], report.snapshot.to_wire(), key[1])


def _store(beats: list[_Heartbeat]) -> None:
    """The heartbeats that change nothing (nearly all of them) in one transaction; each of
    the others as control.node_report stores one (a restart mid-run carries its run on)."""
    changed = []
    with transaction.atomic():
        for beat in beats:
            if not store_heartbeat(beat.node, beat.stored, beat.snapshot, beat.seq):
                changed.append(beat)
    for beat in changed:
        recovery.node_reported(beat.node, beat.snapshot, beat.seq, stored=beat.stored)


def consume(
    client: Any, *, stop: Callable[[], bool], batch: int = BATCH, linger: float = LINGER, summary_every: float = 60.0
) -> Taken:
    """Take heartbeats off the list until `stop()` says so, up to `batch` at a time. After a
    batch that was not full it waits `linger` seconds before it looks again: a heartbeat
    waits at most that long, and the list fills up meanwhile. Taken one by one as they
    come, a batch cost more than its heartbeats (a few statements each: the key
    query, the transaction), and the control host did not even halve its CPU per
    heartbeat against a Celery task each (docs/performance.md, section 6). What is
    waiting stays on the list until it is taken. Logs a summary every `summary_every`
    seconds; returns the total."""
    total, window, since = Taken(), Taken(), time.monotonic()
    down = 0  # broker errors in a row
    while not stop():
        try:
            messages = client.lpop(HEARTBEATS, batch) or []
        except (redis.RedisError, OSError) as exc:
            # The class only: a connection error's text may carry the host, never the URL's password.
            if not down:
                log.warning("heartbeats: the broker did not answer (%s); trying again", type(exc).__name__)
            down += 1
            time.sleep(min(0.1 * 2**down, 5.0))
            continue
        if down:
            log.info("heartbeats: the broker answers again")
            down = 0
        if messages:
            window.add(_take_safely(messages))
        if time.monotonic() - since >= summary_every and (window.stored or window.refused):
            log.info(
                "heartbeats: %d stored, %d superseded, %d refused in the last %.0f s",
                window.stored, window.superseded, window.refused, time.monotonic() - since,
            )  # fmt: skip
            total.add(window)
            window, since = Taken(), time.monotonic()
        if len(messages) < batch:
            time.sleep(linger)
    total.add(window)
    return total


def _take_safely(messages: list[bytes]) -> Taken:
    # A connection gone stale between batches is replaced, as Celery does around a task.
    close_old_connections()
    try:
        return take(messages)
    except DatabaseError as exc:
        log.error("dropped %d heartbeats: the database failed (%s); the next ones say it again", len(messages), exc)
        close_old_connections()
        return Taken()
