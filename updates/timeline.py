"""The plan of a cluster schedule's occurrence as a picture: a server-rendered SVG
(no JavaScript), one row per node, with what really happened under what was planned
and the two bounds drawn as a strip of counts underneath.

`timeline_svg(preview, actual)` is a plain function of its arguments (it reads no
database): every name and note in it is escaped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape
from typing import Any

from django.db.models import OuterRef, QuerySet, Subquery
from django.utils import timezone
from django.utils.safestring import SafeString, mark_safe

from updates.models import UpdateRun, UpdateStep
from updates.placement import peak

# colours: (planned, actual)
OUT_COLOURS = ("#9ecae1", "#2171b5")  # out of the load balancer, users still on it
OFF_COLOURS = ("#fdae6b", "#d94801")  # updating: users logged off
FAILED = "#b2182b"
EXCLUDED = "#d9d9d9"
TICK_STEPS = [timedelta(minutes=m) for m in (1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440)]


@dataclass(frozen=True)
class Actual:
    """What a node's run of the occurrence did: left the load balancer (`out`), users
    logged off (`off`), back in service (`back`); `ended` when it ended otherwise."""

    out: datetime | None
    off: datetime | None
    back: datetime | None
    state: str
    ended: datetime | None = None

    @property
    def running(self) -> bool:
        return self.state == UpdateRun.State.RUNNING


def actual_times(schedule_id: int, occurrence: datetime) -> dict[int, Actual]:
    """The runs of one occurrence, by node id: one query however many nodes."""
    return actual_of(UpdateRun.objects.filter(schedule_id=schedule_id, scheduled_for=occurrence))


def actual_of(runs: QuerySet[UpdateRun]) -> dict[int, Actual]:
    """What these runs (one per node: an occurrence's, a rollout's) did, by node id: one query."""
    steps = UpdateStep.objects.filter(run=OuterRef("pk"))
    runs = runs.annotate(
        out=Subquery(steps.filter(name=UpdateStep.Name.EXCLUDE).values("started_at")[:1]),
        off=Subquery(steps.filter(name=UpdateStep.Name.DRAIN).values("started_at")[:1]),
        back=Subquery(steps.filter(name=UpdateStep.Name.RESUME).values("finished_at")[:1]),
    )
    rows = runs.values_list("node_id", "out", "off", "back", "state", "finished_at")
    return {node_id: Actual(out, off, back, state, finished) for node_id, out, off, back, state, finished in rows}


def local(moment: datetime | None, fmt: str = "%H:%M") -> str:
    return timezone.localtime(moment).strftime(fmt) if moment else ""


def _span(a: datetime, b: datetime) -> str:
    fmt = "%H:%M" if timezone.localtime(a).date() == timezone.localtime(b).date() else "%d.%m. %H:%M"
    return f"{local(a, fmt)}\u2013{local(b, fmt)}"


def _counts(intervals: list[tuple[datetime, datetime]]) -> list[tuple[datetime, int]]:
    """A step function: (from this instant on, this many intervals overlap)."""
    instants = sorted({t for pair in intervals for t in pair})
    return [(t, sum(1 for a, b in intervals if a <= t < b)) for t in instants]


def timeline_svg(
    preview: Any,
    actual: dict[int, Actual],
    now: datetime | None = None,
    *,
    id_prefix: str = "plan",
    width: int = 960,
    caption: str = "",
) -> SafeString:
    """The plan (`updates.plans.Preview`) as an inline SVG. `actual`: node id -> Actual.
    An entry whose `planned_at` is None has no plan (a rollout started by hand): only
    what happened is drawn for it."""
    now = now or timezone.now()
    bounds = preview.bounds
    entries = list(preview.entries)
    name_w, right, top, row_h = 150, 20, 72, 26
    strip_h, strip_gap = 44, 18
    rows_h = max(len(entries), 1) * row_h
    strips_top = top + rows_h + 30
    height = strips_top + 2 * (strip_h + strip_gap) + 10

    # the time span shown: everything planned and everything that happened
    moments = [bounds.occurrence - bounds.lead, bounds.occurrence + timedelta(minutes=10)]
    for entry in entries:
        moments += [t for t in (entry.out_at, entry.back_at) if t]
        seen = actual.get(entry.node_id)
        if seen:
            moments += [t for t in (seen.out, seen.off, seen.back, seen.ended) if t]
            if seen.running:
                moments.append(now)
    start, end = min(moments), max(moments)
    pad = (end - start) * 0.03
    start, end = start - pad, end + pad
    span = (end - start).total_seconds()
    plot_w = width - name_w - right

    def x(moment: datetime) -> float:
        return round(name_w + plot_w * (moment - start).total_seconds() / span, 1)

    caption = caption or (
        f"Plan of {preview.schedule} for {local(bounds.occurrence, '%Y-%m-%d %H:%M')}: {len(entries)} node(s), "
        f"at most {bounds.cap} updating and {bounds.out_bound} out of the load balancer at once, "
        f"lead time {bounds.lead}."
    )
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plan-timeline" id="{escape(id_prefix)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-labelledby="{escape(id_prefix)}-title" '
        'font-family="sans-serif" font-size="11">',
        f'<title id="{escape(id_prefix)}-title">{escape(caption)}</title>',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
    ]

    # legend: two lines
    legend = [
        [
            ("rect", OUT_COLOURS[0], "out of the load balancer, users still on it (planned)"),
            ("rect", OFF_COLOURS[0], "users logged off, updating (planned)"),
            ("rect", EXCLUDED, "left out of this occurrence"),
        ],
        [
            ("thin", OUT_COLOURS[1], "out (actual)"),
            ("thin", OFF_COLOURS[1], "updating (actual)"),
            ("thin", FAILED, "failed / cancelled"),
            ("dash", "#333", "T: the occurrence"),
            ("line", FAILED, "now"),
            ("dash", FAILED, "bound"),
        ],
    ]
    for k, items in enumerate(legend):
        lx, ly = name_w, 6 + 16 * k
        for kind, colour, label in items:
            if kind == "rect":
                out.append(f'<rect x="{lx}" y="{ly}" width="14" height="10" fill="{colour}"/>')
            elif kind == "thin":
                out.append(f'<rect x="{lx}" y="{ly + 3}" width="14" height="4" fill="{colour}"/>')
            else:
                dash = ' stroke-dasharray="3 2"' if kind == "dash" else ""
                out.append(f'<line x1="{lx}" y1="{ly + 5}" x2="{lx + 14}" y2="{ly + 5}" stroke="{colour}"{dash}/>')
            out.append(f'<text x="{lx + 18}" y="{ly + 9}">{escape(label)}</text>')
            lx += 30 + round(5.6 * len(label))

    # time axis: ticks with local times
    step = next((s for s in TICK_STEPS if span / s.total_seconds() <= 10), TICK_STEPS[-1])
    local_start = timezone.localtime(start)
    tick = local_start.replace(second=0, microsecond=0, minute=0)
    if step >= timedelta(days=1):
        tick = tick.replace(hour=0)
    axis_bottom = strips_top + 2 * (strip_h + strip_gap) - strip_gap
    last_day = None
    while tick <= end:
        if tick >= start:
            tx = x(tick)
            day = tick.date()
            label = tick.strftime("%H:%M") if day == last_day else tick.strftime("%d.%m. %H:%M")
            last_day = day
            out.append(f'<line x1="{tx}" y1="{top - 8}" x2="{tx}" y2="{axis_bottom}" stroke="#e5e5e5"/>')
            out.append(f'<text x="{tx}" y="{top - 12}" text-anchor="middle" fill="#555">{label}</text>')
        # in UTC steps, back to local: a DST change keeps the ticks evenly spaced
        tick = timezone.localtime(tick + step)

    # the occurrence T, and now
    tx = x(bounds.occurrence)
    out.append(
        f'<line class="occurrence" x1="{tx}" y1="{top - 6}" x2="{tx}" y2="{axis_bottom}" stroke="#333" '
        f'stroke-dasharray="4 3"><title>T: the occurrence, {local(bounds.occurrence, "%Y-%m-%d %H:%M")}</title></line>'
    )
    out.append(f'<text x="{tx + 3}" y="{top - 1}" font-weight="bold">T</text>')
    if start <= now <= end:
        nx = x(now)
        out.append(
            f'<line class="now" x1="{nx}" y1="{top - 6}" x2="{nx}" y2="{axis_bottom}" stroke="{FAILED}">'
            f"<title>now, {local(now)}</title></line>"
        )
        out.append(f'<text x="{nx + 3}" y="{top - 1}" fill="{FAILED}">now</text>')

    # one row per node: planned bar, actual bar under it
    for i, entry in enumerate(entries):
        y = top + i * row_h
        name = escape(entry.node.hostname)
        out.append(f'<text x="{name_w - 6}" y="{y + 11}" text-anchor="end">{name}</text>')
        if entry.excluded:
            x0, x1 = x(entry.out_at), x(entry.back_at)
            out.append(
                f'<rect class="excluded" x="{x0}" y="{y + 2}" width="{round(x1 - x0, 1)}" '
                f'height="12" fill="{EXCLUDED}" stroke="#999" stroke-dasharray="3 2"><title>{name}: left out of '
                f"this occurrence{': ' + escape(entry.note) if entry.note else ''}</title></rect>"
            )
            out.append(f'<text x="{x(entry.out_at) + 4}" y="{y + 12}" fill="#555">left out</text>')
        elif entry.planned_at is not None:
            waiting = _span(entry.out_at, entry.planned_at)
            updating = _span(entry.planned_at, entry.back_at)
            out += _bar("planned-out", x(entry.out_at), x(entry.planned_at), y + 2, 12, OUT_COLOURS[0],
                        f"{name}: out of the load balancer {waiting} (planned)")  # fmt: skip
            out += _bar("planned-off", x(entry.planned_at), x(entry.back_at), y + 2, 12, OFF_COLOURS[0],
                        f"{name}: users logged off, updating {updating} (planned)")  # fmt: skip
        seen = actual.get(entry.node_id)
        if seen is not None:
            out += _actual_bars(name, seen, now, x, y + 16)

    # the bounds: how many nodes are updating / out of the load balancer over time
    live = [e for e in entries if not e.excluded and e.planned_at is not None]
    off_spans = [(e.planned_at, e.back_at) for e in live]
    out_spans = [(e.out_at, e.back_at) for e in live]
    counted = "planned"
    if entries and not live:  # nothing planned (a rollout started by hand): count what happened
        (off_spans, out_spans), counted = _happened(actual.values(), now), "actual"
    strips: list[tuple[str, list[tuple[datetime, datetime]], int, str]] = [
        ("updating", off_spans, bounds.cap, OFF_COLOURS[1]),
        ("out of LB", out_spans, bounds.out_bound, OUT_COLOURS[1]),
    ]
    for k, (label, intervals, bound, colour) in enumerate(strips):
        y0 = strips_top + k * (strip_h + strip_gap)
        most = peak(intervals, start, end) if intervals else 0
        scale = max(bound, most, 1) + 1
        by = y0 + strip_h - strip_h * bound / scale
        out.append(f'<rect x="{name_w}" y="{y0}" width="{plot_w}" height="{strip_h}" fill="none" stroke="#ccc"/>')
        out.append(f'<text x="{name_w - 6}" y="{y0 + 12}" text-anchor="end">{escape(label)}</text>')
        out.append(
            f'<text x="{name_w - 6}" y="{y0 + 26}" text-anchor="end" fill="#555">at most {bound}, '
            f"{counted} peak {most}</text>"
        )
        points: list[tuple[float, float]] = [(name_w, y0 + strip_h)]
        for moment, count in _counts(intervals):
            level = y0 + strip_h - strip_h * count / scale
            points += [(x(moment), points[-1][1]), (x(moment), level)]
        points.append((name_w + plot_w, points[-1][1]))
        path = " ".join(f"{px},{round(py, 1)}" for px, py in points)
        out.append(
            f'<polyline class="count" points="{path}" fill="none" stroke="{colour}" stroke-width="2">'
            f"<title>nodes {escape(label)} over time ({counted}): at most {most}</title></polyline>"
        )
        out.append(
            f'<line class="bound" x1="{name_w}" y1="{round(by, 1)}" x2="{name_w + plot_w}" y2="{round(by, 1)}" '
            f'stroke="{FAILED}" stroke-dasharray="6 3"><title>bound: at most {bound} {escape(label)}</title></line>'
        )
    out.append("</svg>")
    return mark_safe("\n".join(out))  # noqa: S308  (every text in it went through escape())


def _happened(
    seen: Iterable[Actual], now: datetime
) -> tuple[list[tuple[datetime, datetime]], list[tuple[datetime, datetime]]]:
    """What the runs did, as intervals: updating (users logged off until back, or the run's
    end), and out of the load balancer (from leaving it, else from being logged off)."""
    updating: list[tuple[datetime, datetime]] = []
    out_of_lb: list[tuple[datetime, datetime]] = []
    for run in seen:
        until, left = run.back or run.ended or now, run.out or run.off
        if run.off:
            updating.append((run.off, until))
        if left:
            out_of_lb.append((left, until))
    return updating, out_of_lb


def _bar(cls: str, x0: float, x1: float, y: float, h: int, colour: str, title: str) -> list[str]:
    w = max(round(x1 - x0, 1), 1)
    return [
        f'<rect class="{cls}" x="{x0}" y="{y}" width="{w}" height="{h}" fill="{colour}"><title>{title}</title></rect>'
    ]


def _actual_bars(name: str, seen: Actual, now: datetime, x: Any, y: float) -> list[str]:
    """The thinner bar under a node's plan: what its run did (a running one up to now)."""
    bars: list[str] = []
    until = seen.back or seen.ended or (now if seen.running else None)
    if until is None:
        return bars
    failed = seen.state in (UpdateRun.State.FAILED, UpdateRun.State.CANCELLED)
    state = "" if seen.state == UpdateRun.State.SUCCEEDED else f" ({seen.state}{', so far' if seen.running else ''})"
    if seen.out:
        end_out = seen.off or until
        bars += _bar("actual-out", x(seen.out), x(end_out), y, 5, OUT_COLOURS[1],
                     f"{name}: out of the load balancer {_span(seen.out, end_out)} (actual){state}")  # fmt: skip
    if seen.off:
        colour = FAILED if failed else OFF_COLOURS[1]
        bars += _bar("actual-off", x(seen.off), x(until), y, 5, colour,
                     f"{name}: users logged off {_span(seen.off, until)} (actual){state}")  # fmt: skip
    return bars
