"""The Nagios sensor check_versions: is every node on the newest release of its
channel, and has a download failed (the manual's "warning flag")?

Plain functions returning ``Result(code, line)``; the management command only
prints the line and exits with the code. The line follows the plugin
conventions: ``CHECK_VERSIONS <STATE> - <text> | <performance data>``, one line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from django.db.models import Exists, OuterRef, QuerySet, Subquery

from agent.shared.protocol import version_key
from nodes.models import Node
from updates.models import Release, UpdateLock

SERVICE = "CHECK_VERSIONS"
DOWNLOAD_FAILED = "Update download failed"  # the manual's wording, verbatim
MAX_NAMED = 5  # nodes named in a fleet line; the counts are in the performance data


class Status(IntEnum):
    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


# How bad a state is when several are summed up. Not the exit code order: a
# known download failure is worse than a node we know nothing about, and an
# unknown node may hide anything, so it is worse than a known warning.
SEVERITY = {Status.OK: 0, Status.WARNING: 1, Status.UNKNOWN: 2, Status.CRITICAL: 3}


class Result(NamedTuple):
    code: int
    line: str


@dataclass(frozen=True)
class Finding:
    """What the check found out about one node."""

    node: str
    status: Status
    text: str
    outdated: bool = False
    locked: bool = False
    download_failed: bool = False


def worst(statuses: Iterable[Status]) -> Status:
    return max(statuses, key=SEVERITY.__getitem__, default=Status.OK)


def exit_code(result: Result | Status) -> int:
    """The process exit code Nagios expects for a result."""
    return int(result.code if isinstance(result, Result) else result)


def clean(text: str, limit: int = 80) -> str:
    # '|' would start the performance data and Nagios reads only the first line.
    text = re.sub(r"\s+", " ", text.replace("|", "/")).strip()
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def render(status: Status, text: str, perf: dict[str, int]) -> Result:
    data = " ".join(f"{key}={value}" for key, value in perf.items())
    return Result(int(status), f"{SERVICE} {status.name} - {clean(text, 400)} | {data}")


def unknown(text: str) -> Result:
    return Result(int(Status.UNKNOWN), f"{SERVICE} UNKNOWN - {clean(text, 400)}")


# --- one node ---------------------------------------------------------------------


def _older(installed: str, newest: str) -> bool | None:
    """True if installed is older than newest; None if a version is not numeric."""
    try:
        return version_key(installed) < version_key(newest)
    except ValueError:
        return None


def assess(node: Node, newest: Release | None, lock_reason: str | None) -> Finding:
    """The state of one node, given its active lock's reason (None: no lock) and
    the newest release of its channel. No queries."""
    name = node.hostname
    locked = lock_reason is not None
    outdated = bool(newest and node.installed_version and node.installed_version != newest.version)
    if node.download_warning:
        # A fact the control plane recorded: it stands even if the rest is unclear.
        text = f"{name}: {DOWNLOAD_FAILED}"
        return Finding(name, Status.CRITICAL, text, outdated=outdated, locked=locked, download_failed=True)
    if node.last_seen is None:
        return Finding(name, Status.UNKNOWN, f"{name} has never reported", locked=locked)
    if not node.installed_version:
        return Finding(name, Status.UNKNOWN, f"{name} reported no installed version", locked=locked)
    if newest is None:
        text = f"{name}: no {node.channel} release known to compare with"
        return Finding(name, Status.UNKNOWN, text, locked=locked)
    problems = []
    if locked:
        problems.append(f"update lock active ({clean(lock_reason or 'no reason given', 60)})")
    if outdated:
        older = _older(node.installed_version, newest.version)
        if older:
            problems.append(f"runs {node.installed_version}, {newest.version} ({newest.channel}) is available")
        else:
            problems.append(f"runs {node.installed_version}, not the newest {newest.channel} release {newest.version}")
    if problems:
        text = f"{name}: " + "; ".join(problems)
        return Finding(name, Status.WARNING, text, outdated=outdated, locked=locked)
    return Finding(name, Status.OK, f"{name} runs {newest.version}, the newest {newest.channel} release")


def node_result(finding: Finding) -> Result:
    perf = {
        "outdated": int(finding.outdated),
        "locked": int(finding.locked),
        "download_failed": int(finding.download_failed),
    }
    return render(finding.status, finding.text, perf)


def check_node(node: Node) -> Result:
    """The sensor for one node (two queries: its lock and its channel's newest release)."""
    lock = UpdateLock.objects.active().filter(node=node).values_list("reason", flat=True).first()
    return node_result(assess(node, Release.newest(node.channel), lock))


# --- several nodes ----------------------------------------------------------------


def with_lock_state(nodes: QuerySet[Node]) -> QuerySet[Node]:
    """Annotate each node's active lock so a whole cluster costs one query, not one per node."""
    active = UpdateLock.objects.active().filter(node=OuterRef("pk"))
    return nodes.annotate(has_lock=Exists(active), lock_reason=Subquery(active.values("reason")[:1]))


def newest_by_channel(channels: Iterable[str]) -> dict[str, Release | None]:
    """One query per channel (there are two), however many nodes share it."""
    return {channel: Release.newest(channel) for channel in sorted(set(channels))}


def _lock_reason(node: Node) -> str | None:
    if hasattr(node, "has_lock"):
        return (getattr(node, "lock_reason", None) or "") if node.has_lock else None
    # A plain list of nodes: still correct, but a query per node.
    return node.locks.active().values_list("reason", flat=True).first()


def assess_all(nodes: Iterable[Node] | QuerySet[Node]) -> list[Finding]:
    rows = list(with_lock_state(nodes) if isinstance(nodes, QuerySet) else nodes)
    newest = newest_by_channel(n.channel for n in rows)
    return [assess(node, newest[node.channel], _lock_reason(node)) for node in rows]


def check_nodes(nodes: Iterable[Node] | QuerySet[Node], scope: str = "") -> Result:
    """The worst state over the nodes; the line names the worst nodes.

    Pass a QuerySet to keep the number of queries fixed (one for the nodes with
    their locks, one per channel). `scope` names what was checked ("cluster c1").
    """
    findings = assess_all(nodes)
    if not findings:
        return unknown(f"no nodes in {scope}" if scope else "no nodes")
    counts = {status: sum(f.status == status for f in findings) for status in Status}
    perf = {
        "nodes": len(findings),
        "critical": counts[Status.CRITICAL],
        "warning": counts[Status.WARNING],
        "unknown": counts[Status.UNKNOWN],
        "ok": counts[Status.OK],
    }
    status = worst(f.status for f in findings)
    if status == Status.OK:
        where = f" of {scope}" if scope else ""
        return render(status, f"all {len(findings)} nodes{where} run the newest release of their channel", perf)
    named = [f.text for f in findings if f.status == status]
    text = "; ".join(named[:MAX_NAMED])
    if len(named) > MAX_NAMED:
        text += f"; and {len(named) - MAX_NAMED} more"
    if scope:
        text = f"{scope}: {text}"
    return render(status, text, perf)
