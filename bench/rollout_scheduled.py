"""1, on the path the manual recommends for clusters: the same rollout (200 nodes, cap
10, the same 1-3 s draws) as a time-controlled update of the whole cluster. The
nodes download in the schedule's download phase, ahead of the update time and
outside the makespan; at the update time each node takes a slot, leaves the load
balancer (`exclude`), holds for the lead time (0 here), logs its users off and
installs. Two hand-offs more per node than an Auto-Update (exclude, hold), and no
downloads competing with the first nodes out of service. Results and picture as
"rollout-scheduled"."""

from __future__ import annotations

from typing import Any

from bench import rollout

OPTIONS = {"nodes"}


def run(nodes: int = 200) -> dict[str, Any]:
    return rollout.run(nodes, path="scheduled")
