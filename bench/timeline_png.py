"""The rollout timeline as a PNG (Pillow): one bar per node, the number of nodes
out of service underneath, with the cap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

# (key in a row, colour, legend)
SEGMENTS = [
    ("wait", (225, 225, 225), "waiting for a slot"),
    ("prep", (120, 180, 230), "out of service, before install (exclude, hold, drain, checks)"),
    ("install", (30, 90, 170), "install (the node's duration)"),
    ("post", (240, 150, 40), "verify + resume"),
    ("complete", (90, 90, 90), "complete (slot released)"),
    ("stuck", (220, 40, 40), "stuck holding a slot"),
]


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _dashed_vline(draw: ImageDraw.ImageDraw, x: float, y0: int, y1: int, colour: tuple[int, int, int]) -> None:
    for y in range(y0, y1, 8):
        draw.line([(x, y), (x, min(y + 4, y1))], fill=colour, width=2)


def draw(rows: list[dict[str, float]], concurrency: list[tuple[float, int]], *, cap: int, marks: dict[str, float],
         title: str, out: Path, origin: str = "the first start_update") -> None:  # fmt: skip
    """rows: per node, times in seconds from the first start: created, out (out of service), install,
    install_end, resume_end, finished. concurrency: (t, nodes out of service from t on)."""
    n = len(rows)
    bar, pitch = 3, 4
    left, right, top = 80, 30, 70
    width = 1600
    bars_h = n * pitch
    gap = 30
    plot_h = 200
    bottom = 90
    height = top + bars_h + gap + plot_h + bottom
    end = max([r["finished"] for r in rows if r["finished"] == r["finished"]] + list(marks.values())) * 1.03
    scale = (width - left - right) / end

    def x(t: float) -> float:
        return left + t * scale

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    small, normal = _font(13), _font(16)
    d.text((left, 12), title, fill="black", font=normal)

    # Legend.
    lx = left
    for _, colour, label in SEGMENTS:
        d.rectangle([lx, 42, lx + 14, 54], fill=colour)
        d.text((lx + 18, 40), label, fill="black", font=small)
        lx += 30 + int(d.textlength(label, font=small))

    # One bar per node, in start order (top: started first).
    for i, r in enumerate(rows):
        y = top + i * pitch
        if "stuck_until" in r:
            spans = [("wait", r["created"], r["slot"]), ("stuck", r["slot"], r["stuck_until"])]
        else:
            spans = [
                ("wait", r["created"], r["out"]),
                ("prep", r["out"], r["install"]),
                ("install", r["install"], r["install_end"]),
                ("post", r["install_end"], r["resume_end"]),
                ("complete", r["resume_end"], r["finished"]),
            ]
        colours = {k: c for k, c, _ in SEGMENTS}
        for key, a, b in spans:
            if b > a:  # NaN compares False
                d.rectangle([x(a), y, max(x(b), x(a) + 1), y + bar - 1], fill=colours[key])
    d.text((8, top), "node 1", fill="black", font=small)
    d.text((8, top + bars_h - 14), f"node {n}", fill="black", font=small)

    # Nodes out of service (out of the load balancer .. resume end) over time, and the cap.
    py0 = top + bars_h + gap
    py1 = py0 + plot_h
    peak = max([c for _, c in concurrency] + [cap])
    ymax = peak + 2

    def y(v: float) -> float:
        return py1 - v / ymax * plot_h

    d.rectangle([left, py0, width - right, py1], outline=(160, 160, 160))
    for v in range(0, ymax + 1, 2):
        d.line([(left - 4, y(v)), (left, y(v))], fill="black")
        d.text((left - 28, y(v) - 8), str(v), fill="black", font=small)
    d.line([(left, y(cap)), (width - right, y(cap))], fill=(200, 30, 30), width=2)
    d.text((width - right - 190, y(cap) - 18), f"cap = {cap} nodes at once", fill=(200, 30, 30), font=small)
    points = []
    for (t, c), (t_next, _) in zip(concurrency, concurrency[1:] + [(end, 0)], strict=True):
        points += [(x(t), y(c)), (x(t_next), y(c))]
    if points:
        d.line(points, fill=(30, 90, 170), width=2)
    label = "nodes out of service (out of the load balancer .. resume done, node times)"
    d.text((left + 4, py0 - 18), label, fill="black", font=small)

    # Time axis and the marks (measured makespan, ideal, batching).
    d.line([(left, py1), (width - right, py1)], fill="black")
    step = 5 if end <= 100 else 10 if end <= 200 else 30
    for t in range(0, int(end) + 1, step):
        d.line([(x(t), py1), (x(t), py1 + 5)], fill="black")
        d.text((x(t) - 8, py1 + 8), str(t), fill="black", font=small)
    d.text((width // 2 - 120, py1 + 28), f"seconds from {origin}", fill="black", font=small)
    mark_colours = [(0, 0, 0), (20, 150, 60), (200, 30, 30), (140, 60, 160)]
    for k, (label, t) in enumerate(marks.items()):
        colour = mark_colours[k % len(mark_colours)]
        _dashed_vline(d, x(t), top - 6, py1, colour)
        d.text((left + 10 + 380 * k, py1 + 52), f"- - {label}: {t:.1f} s", fill=colour, font=small)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
