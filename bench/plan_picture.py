"""The picture of a plan in the README (docs/plan.svg): a demo plan drawn by the
same function the admin pages use (updates/timeline.py), no database involved.

    python bench/plan_picture.py [OUT]

Six nodes, cap 2, at most 3 out of the load balancer, a lead of 30 minutes; the
occurrence is under way: two nodes are back, one overran (the node after it was
moved later and its users told), one is left out by an operator.
"""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
MIN = timedelta(minutes=1)


def main(out: Path) -> None:
    os.environ.pop("DATABASE_URL", None)
    os.environ["DJANGO_SETTINGS_MODULE"] = "tgpadmin.settings"
    os.environ.setdefault("TGP_VAR_DIR", tempfile.mkdtemp(prefix="plan-picture-"))
    os.environ.setdefault("DJANGO_SECRET_KEY", "plan-picture-only-" + "x" * 40)
    os.environ["TGP_TIME_ZONE"] = "Europe/Berlin"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from nodes.models import Cluster, Node
    from updates.models import PlanEntry, UpdatePlan, UpdateSchedule
    from updates.placement import Bounds, Todo, place
    from updates.plans import Preview
    from updates.timeline import Actual, timeline_svg

    occurrence = datetime(2026, 3, 1, 3, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    bounds = Bounds(occurrence, lead=30 * MIN, cap=2, out_bound=3)
    expected = {"gw1": 14, "gw2": 18, "gw3": 15, "gw4": 16, "gw5": 14, "gw6": 15}
    cluster = Cluster(name="tgp", max_parallel_updates=2, max_out_of_lb=3, lb_lead_time=bounds.lead)
    schedule = UpdateSchedule(name="Sunday night", cluster=cluster, cron="0 3 * * 0")
    plan = UpdatePlan(schedule=schedule, cluster=cluster, occurrence=occurrence, lead=bounds.lead, cap=2, out_bound=3)
    nodes = {name: Node(pk=i, hostname=name, cluster=cluster) for i, name in enumerate(expected, 1)}
    slots = {s.node: s for s in place(bounds, [Todo(n, m * MIN, occurrence) for n, m in expected.items()])}
    entries = [
        PlanEntry(plan=plan, node=nodes[n], planned_at=slots[n].at, expected=m * MIN) for n, m in expected.items()
    ]
    by_name = {e.node.hostname: e for e in entries}
    # gw3 overran (expected 15 minutes, still updating after 24): gw5 was moved later.
    by_name["gw5"].planned_at += 8 * MIN
    by_name["gw5"].note = f"delayed from {slots['gw5'].at:%H:%M:%S}: a node before it overran"
    by_name["gw6"].excluded, by_name["gw6"].note = True, "left out by operator"
    t = occurrence
    actual = {
        1: Actual(t - 30 * MIN, t, t + 13 * MIN, "succeeded"),
        2: Actual(t - 30 * MIN, t + 1 * MIN, t + 20 * MIN, "succeeded"),
        3: Actual(slots["gw3"].out_from, slots["gw3"].at, None, "running"),
        4: Actual(slots["gw4"].out_from, None, None, "running"),  # out, waiting for its time
    }
    now = slots["gw3"].at + 24 * MIN
    preview = Preview(schedule, occurrence, bounds, entries, {"gw7": "update lock: download failed"}, stored=True)
    out.write_text(timeline_svg(preview, actual, now, id_prefix="demo-plan") + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "plan.svg")
