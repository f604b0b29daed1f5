"""Where each node of a cluster goes in a rolling update: plain arithmetic on
intervals, no database (updates/plans.py feeds it and stores what it says).

A node planned at `t` (its users are logged off then) with an expected duration
`d` is *updating* in [t, t + d) and *out of the load balancer* in
[t - lead, t + d). A plan never has more than `cap` nodes updating, nor more than
`out_bound` out of the load balancer, at any instant. Each node goes at the
earliest time that keeps both bounds, in the order given: the first wave at the
occurrence itself, later ones as soon as nodes before them are expected back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Bounds:
    occurrence: datetime
    lead: timedelta
    cap: int
    out_bound: int


@dataclass(frozen=True)
class Slot:
    """One node's place: logged off at `at`, out of the load balancer from `out_from`
    (the lead before `at`, or earlier if it left already), back at `back`."""

    node: str
    at: datetime
    back: datetime
    out_from: datetime


@dataclass(frozen=True)
class Todo:
    """A node still to be placed: never before `not_before` (a time its users were told
    already is never brought forward), and, if it is out already, out since `out_since`."""

    node: str
    expected: timedelta
    not_before: datetime
    out_since: datetime | None = None


def peak(intervals: Iterable[tuple[datetime, datetime]], start: datetime, end: datetime) -> int:
    """The most intervals [a, b) that overlap at one instant within [start, end)."""
    clipped = [(max(a, start), min(b, end)) for a, b in intervals if a < end and b > start]
    events = sorted([(a, 1) for a, _ in clipped] + [(b, -1) for _, b in clipped], key=lambda e: (e[0], e[1]))
    most = current = 0
    for _, change in events:  # an end and a start at the same instant: the end first
        current += change
        most = max(most, current)
    return most


def problem(bounds: Bounds, placed: Sequence[Slot], slot: Slot) -> str:
    """Why `slot` does not fit beside `placed` (the other nodes), or "" if it does."""
    if slot.at < bounds.occurrence:
        return f"before the occurrence ({bounds.occurrence:%Y-%m-%d %H:%M})"
    others = [p for p in placed if p.node != slot.node]
    updating = peak(((p.at, p.back) for p in others), slot.at, slot.back)
    if updating >= bounds.cap:
        return f"{updating + 1} nodes would be updating at once (at most {bounds.cap})"
    out = peak(((p.out_from, p.back) for p in others), slot.out_from, slot.back)
    if out >= bounds.out_bound:
        return f"{out + 1} nodes would be out of the load balancer at once (at most {bounds.out_bound})"
    return ""


def _slot(bounds: Bounds, todo: Todo, at: datetime) -> Slot:
    out_from = at - bounds.lead
    if todo.out_since is not None:
        out_from = min(out_from, todo.out_since)
    return Slot(todo.node, at, at + todo.expected, out_from)


def earliest(bounds: Bounds, placed: Sequence[Slot], todo: Todo) -> Slot:
    """The first time at or after max(occurrence, not_before) that keeps both bounds.
    Only instants where a bound can start to hold are tried: the start itself, and
    each placed node's return (a slot free), and that return plus the lead (a place
    out of the load balancer free for a whole lead time)."""
    start = max(bounds.occurrence, todo.not_before)
    tried = {start} | {p.back for p in placed} | {p.back + bounds.lead for p in placed}
    for at in sorted(t for t in tried if t >= start):
        slot = _slot(bounds, todo, at)
        if not problem(bounds, placed, slot):
            return slot
    # Unreachable for sane bounds (after everyone is back, a node fits), but say so.
    raise ValueError(f"{todo.node} fits nowhere: cap {bounds.cap}, out of the load balancer {bounds.out_bound}")


def place(bounds: Bounds, todo: Sequence[Todo], fixed: Sequence[Slot] = ()) -> list[Slot]:
    """Place the nodes of `todo` in order beside the `fixed` ones; returns all slots."""
    if bounds.cap < 1 or bounds.out_bound < bounds.cap:
        raise ValueError(f"bounds cannot be kept: cap {bounds.cap}, out of the load balancer {bounds.out_bound}")
    placed = list(fixed)
    for node in todo:
        placed.append(earliest(bounds, placed, node))
    return placed
