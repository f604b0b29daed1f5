"""The fleet benchmark's picture (Pillow): the control queue's length and the
heartbeat lag p99 over the long run, one point per 10 s."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from bench.timeline_png import _font

WIDTH, PLOT_H, LEFT, RIGHT, TOP, GAP, BOTTOM = 1200, 220, 90, 30, 60, 70, 50


def _plot(d: ImageDraw.ImageDraw, top: int, points: list[tuple[float, float]], *, end: float, label: str,
          unit: str, colour: tuple[int, int, int], floor: float, line: float | None = None) -> None:  # fmt: skip
    small = _font(13)
    peak = max([floor, *(v for _, v in points), *([line * 1.2] if line else [])])
    sx, sy = (WIDTH - LEFT - RIGHT) / max(end, 1.0), PLOT_H / peak
    d.rectangle([LEFT, top, WIDTH - RIGHT, top + PLOT_H], outline=(160, 160, 160))
    d.text((LEFT, top - 20), label, fill="black", font=small)
    for frac in (0.0, 0.5, 1.0):
        y = top + PLOT_H - frac * PLOT_H
        d.text((8, y - 7), f"{peak * frac:.3g} {unit}", fill=(90, 90, 90), font=small)
    if line is not None:
        y = top + PLOT_H - line * sy
        for x in range(LEFT, WIDTH - RIGHT, 10):
            d.line([(x, y), (x + 5, y)], fill=(220, 40, 40), width=1)
        d.text((WIDTH - RIGHT - 120, y - 16), f"target {line:g} {unit}", fill=(220, 40, 40), font=small)
    xy = [(LEFT + t * sx, top + PLOT_H - v * sy) for t, v in points]
    if len(xy) > 1:
        d.line(xy, fill=colour, width=2)


def draw(series: list[dict[str, float]], nodes: int, out: Path) -> None:
    height = TOP + 2 * PLOT_H + GAP + BOTTOM
    img = Image.new("RGB", (WIDTH, height), "white")
    d = ImageDraw.Draw(img)
    title = f"Fleet benchmark: {nodes} simulated nodes, heartbeats every 15 s, one control host (2 processes)"
    d.text((LEFT, 12), title, fill="black", font=_font(16))
    end = max((p["t"] for p in series), default=0.0) + 10
    _plot(d, TOP + 10, [(p["t"], p["queue"]) for p in series], end=end, unit="msgs", colour=(30, 90, 170),
          label="waiting: control queue + heartbeats list (largest in each 10 s)", floor=10.0)  # fmt: skip
    _plot(d, TOP + PLOT_H + GAP, [(p["t"], p["lag_p99"]) for p in series], end=end, unit="s", colour=(240, 150, 40),
          label="heartbeat to database, p99 lag (each 10 s)", floor=0.1, line=5.0)  # fmt: skip
    d.text((LEFT, height - 30), f"seconds into the run (0 - {end:.0f})", fill=(90, 90, 90), font=_font(13))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
