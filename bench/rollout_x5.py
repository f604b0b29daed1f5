"""1, a second time: the same rollout (200 nodes, cap 10, the same draws) with each
install five times as long, 5-15 s instead of 1-3 s. What a node costs beyond its
install is fixed (hand-offs, the control plane's work), so it weighs five times less
against the ideal; the floor (the last nodes do not end together) stays 1.036 x.
Results and picture as "rollout-x5"."""

from __future__ import annotations

from typing import Any

from bench import rollout

OPTIONS = {"nodes"}
SCALE = 5.0


def run(nodes: int = 200) -> dict[str, Any]:
    return rollout.run(nodes, scale=SCALE)
