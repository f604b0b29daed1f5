"""Announced updates: the manual's Auto-Update, "1. schedule maintenance (approx. 2 hours
before carrying out the update!) 2. Update".

An operator announces an update of some nodes for a time: each node gets a
MaintenanceNotice with the release (state "pending"), and its users a notice now that
names the time (the agent writes it in the appliance's zone). At that time the
control queue's sweep (beat: control.start_announced_updates) claims each due notice
with a conditional UPDATE and starts its update, as the operator who announced it.
Everything an Auto-Update checks is checked at the announcement and again at the
start; a refusal at the start is kept on the notice (state "refused", outcome) and
logged. Until then a member of group ``update`` may cancel it: its users are told
that it is off, and users who log on later are no longer told of it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agent.shared.protocol import WHEN
from audit.records import Operation, record_each
from nodes.models import Node
from updates.models import MaintenanceNotice, Release, UpdateRun
from updates.notices import send_notice
from updates.runs.start import StartChecks, UpdateRefused, check_can_start, start_update

log = logging.getLogger(__name__)

# An update announced further ahead than this is refused: users would forget it, and
# a schedule (updates.UpdateSchedule) is the tool for dates that far out.
MAX_AHEAD = timedelta(days=7)


def default_message(release: Release) -> str:
    return (
        f"This server will be updated to version {release.version} {WHEN}. Please save your work in time: "
        "you will be logged off then and can log on again after the update."
    )


def withdrawal_message() -> str:
    return f"The maintenance planned {WHEN} is off: you will not be logged off then."


def check_update_time(starts_at: datetime, now: datetime | None = None) -> None:
    """UpdateRefused unless `starts_at` lies ahead, at most MAX_AHEAD."""
    now = now or timezone.now()
    shown = f"{timezone.localtime(starts_at):%Y-%m-%d %H:%M %Z}"
    if starts_at <= now:
        raise UpdateRefused(f"The update time {shown} lies in the past: choose a time ahead, or update now.")
    if starts_at - now > MAX_AHEAD:
        raise UpdateRefused(
            f"The update time {shown} is more than {MAX_AHEAD.days} days ahead: announce it nearer the time, "
            "or plan it as a schedule."
        )


def announce_updates(
    targets: Sequence[tuple[Node, Release]], starts_at: datetime, user: Any, message: str = ""
) -> tuple[list[MaintenanceNotice], list[str]]:
    """Announce the update of each node to its release for `starts_at`: the notices
    of the nodes that may update (their users are told now), and the reasons for the
    ones that may not. UpdateRefused (nothing announced) for a time that is not ahead
    or too far ahead."""
    check_update_time(starts_at)
    by = user if getattr(user, "pk", None) else None
    with transaction.atomic():
        # Locked like a start: an announcement and a start of the same node never cross.
        ids = [node.pk for node, _ in targets]
        locked = {n.pk: n for n in Node.objects.select_for_update(of=("self",)).filter(pk__in=ids).order_by("pk")}
        checks = StartChecks.read(locked.values())
        pending = dict(MaintenanceNotice.objects.pending().filter(node_id__in=ids).values_list("node_id", "starts_at"))
        notices, refused = [], []
        for given, release in targets:
            node = locked.get(given.pk)
            try:
                if node is None:
                    raise UpdateRefused(f"{given} no longer exists.")
                if node.pk in pending:
                    when = f"{timezone.localtime(pending[node.pk]):%Y-%m-%d %H:%M %Z}"
                    raise UpdateRefused(f"{node} has an update announced for {when} already; cancel it first.")
                check_can_start(node, release, UpdateRun.Trigger.MANUAL, checks=checks)
            except UpdateRefused as exc:
                refused.append(str(exc))
                continue
            pending[node.pk] = starts_at  # the same node twice: once
            notices.append(
                MaintenanceNotice(
                    node=node, release=release, message=message or default_message(release), starts_at=starts_at,
                    created_by=by, state=MaintenanceNotice.State.PENDING,
                )
            )  # fmt: skip
        MaintenanceNotice.objects.bulk_create(notices)
        rows = []
        for notice in notices:
            assert notice.node is not None and notice.release is not None
            send_notice(notice.node, f"notice-{notice.pk}", notice.message, starts_at)
            rows.append((notice, {"release": notice.release.version, "starts_at": starts_at}))
            log.info(
                "update of %s to %s announced for %s (notice %s)", notice.node, notice.release, starts_at, notice.pk
            )
        record_each(Operation.ANNOUNCE_UPDATE, rows, user=user)
    return notices, refused


def start_due(now: datetime | None = None) -> list[str]:
    """Start every announced update whose time has come; what became of each, one line
    per notice. Safe to run twice, and from two places at once: each notice is claimed
    by a conditional UPDATE in the transaction that starts its update."""
    now = now or timezone.now()
    due = list(MaintenanceNotice.objects.due(now).order_by("starts_at", "pk").values_list("pk", flat=True)[:500])
    return [line for pk in due if (line := start_announced(pk, now))]


def start_announced(notice_id: int, now: datetime | None = None) -> str:
    """Start the update a due notice announces, once; "" if somebody else did (or it was
    cancelled). A refusal (the node got an update lock meanwhile, say) stays on the notice."""
    now = now or timezone.now()
    with transaction.atomic():
        claimed = MaintenanceNotice.objects.due(now).filter(pk=notice_id)
        if not claimed.update(state=MaintenanceNotice.State.STARTED, decided_at=now):
            return ""
        notice = MaintenanceNotice.objects.select_related("node", "release", "created_by").get(pk=notice_id)
        assert notice.node is not None and notice.release is not None
        try:
            late = now - notice.starts_at
            if late > timedelta(seconds=settings.TGP_ANNOUNCED_UPDATE_GRACE):
                raise UpdateRefused(
                    f"it was due {int(late.total_seconds() // 60)} minutes ago (was the control worker or beat "
                    "down?): users who logged on since were not told. Announce it again."
                )
            run = start_update(notice.node, notice.release, user=notice.created_by, message=notice.message)
        except UpdateRefused as exc:
            outcome = f"Not started at its time: {exc}"
            MaintenanceNotice.objects.filter(pk=notice_id).update(
                state=MaintenanceNotice.State.REFUSED, outcome=outcome
            )
            log.warning("announced update of %s (notice %s) refused: %s", notice.node, notice_id, exc)
            return f"{notice.node}: {outcome}"
        MaintenanceNotice.objects.filter(pk=notice_id).update(run=run)
    log.info("announced update of %s (notice %s) started: run %s", notice.node, notice_id, run.pk)
    return f"{notice.node}: run {run.pk} started"


def cancel(notices: Sequence[MaintenanceNotice], user: Any, now: datetime | None = None) -> int:
    """Cancel announced updates that have not started (and notices whose time lies ahead);
    their users are told that the maintenance is off. Returns how many were cancelled."""
    now = now or timezone.now()
    cancelled: list[MaintenanceNotice] = []
    with transaction.atomic():
        for notice in notices:
            cancellable = MaintenanceNotice.objects.filter(pk=notice.pk, state=MaintenanceNotice.State.PENDING) | (
                MaintenanceNotice.objects.filter(pk=notice.pk, state=MaintenanceNotice.State.NOTICE, starts_at__gt=now)
            )
            moved = cancellable.update(
                state=MaintenanceNotice.State.CANCELLED, decided_at=now, outcome=f"Cancelled by {user}."
            )
            if not moved:
                continue
            cancelled.append(notice)
            nodes = [notice.node] if notice.node else list(Node.objects.filter(cluster=notice.cluster))
            for node in nodes:
                send_notice(
                    node,
                    f"notice-{notice.pk}-off",
                    withdrawal_message(),
                    notice.starts_at,
                    withdraws=f"notice-{notice.pk}",
                )
        cancelled_items = [(notice, {"starts_at": notice.starts_at}) for notice in cancelled]
        record_each(Operation.CANCEL_ANNOUNCEMENT, cancelled_items, user=user)
    return len(cancelled)
