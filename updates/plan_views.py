"""The plan on the schedule's and the cluster's pages: which occurrence to show, its
picture and table (`plan_for`), and the operator's changes (group `update`): move a
node, leave it out of the occurrence or put it back, put back a node that left the
schedule. Every change is a POST that answers with a redirect and a message; a
refused one changes nothing (the plan a first edit would store included)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.contrib import messages
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import SafeString

from audit.records import Operation, record
from nodes.admin import require
from updates import plans
from updates.models import LeftSchedule, PlanEntry, UpdateLock, UpdatePlan, UpdateRun, UpdateSchedule
from updates.schedules import next_update_at
from updates.timeline import Actual, actual_times, timeline_svg

PERM = "nodes.start_update"


@dataclass
class Row:
    entry: PlanEntry
    actual: Actual | None

    @property
    def move_value(self) -> str:
        """The entry's time for a datetime-local input, in the server's time zone."""
        return timezone.localtime(self.entry.planned_at).strftime("%Y-%m-%dT%H:%M:%S")


@dataclass
class PlanView:
    schedule: UpdateSchedule
    occurrence: datetime | None
    why_none: str = ""
    preview: plans.Preview | None = None
    rows: list[Row] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)
    left_schedule: list[LeftSchedule] = field(default_factory=list)
    svg: SafeString | None = None

    @property
    def occurrence_value(self) -> str:
        return self.occurrence.isoformat() if self.occurrence else ""

    @property
    def tz_name(self) -> str:
        return timezone.get_current_timezone_name()

    @property
    def element_id(self) -> str:
        return f"plan-{self.schedule.pk}"


def occurrence_to_show(schedule: UpdateSchedule, now: datetime) -> datetime | None:
    """A stored plan still under way (a run of it runs, or a node of it is not yet
    expected back), else the schedule's next occurrence (None with time control off)."""
    latest = UpdatePlan.objects.filter(schedule=schedule, occurrence__lte=now).order_by("-occurrence").first()
    if latest is not None:
        running = UpdateRun.objects.running().filter(schedule=schedule, scheduled_for=latest.occurrence).exists()
        times = latest.entries.filter(excluded=False).values_list("planned_at", "expected")
        if running or any(at + expected > now for at, expected in times):
            return latest.occurrence
    if not schedule.time_control:
        return None
    return next_update_at(schedule, now)


def plan_for(schedule: UpdateSchedule, now: datetime | None = None) -> PlanView:
    """What the page shows of a cluster schedule's plan: a fixed number of queries
    however many nodes the cluster has."""
    now = now or timezone.now()
    occurrence = occurrence_to_show(schedule, now)
    view = PlanView(schedule, occurrence)
    view.left_schedule = list(LeftSchedule.objects.filter(schedule=schedule).select_related("node"))
    if occurrence is None:
        view.why_none = (
            "Time control is off." if not schedule.time_control
            else "Download only: no update, so no plan." if schedule.download_only
            else "No upcoming occurrence."
        )  # fmt: skip
        return view
    preview = plans.preview(schedule, occurrence)
    actual = actual_times(schedule.pk, occurrence)
    view.preview = preview
    view.rows = [Row(entry, actual.get(entry.node_id)) for entry in preview.entries]
    left_hosts = {left.node.hostname for left in view.left_schedule}
    view.left_out = sorted((host, why) for host, why in preview.left_out.items() if host not in left_hosts)
    view.svg = timeline_svg(preview, actual, now, id_prefix=view.element_id)
    return view


# --- the operator's changes -------------------------------------------------------------------


def _back(request: HttpRequest, schedule: UpdateSchedule) -> HttpResponseRedirect:
    """Back to the page the form was on (the schedule's or its cluster's), else the schedule's."""
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(target, {request.get_host()}, request.is_secure()):
        target = reverse("admin:updates_updateschedule_change", args=[schedule.pk])
    return HttpResponseRedirect(target)


class BadInput(Exception):
    pass


def _occurrence(request: HttpRequest, schedule: UpdateSchedule) -> datetime:
    """The posted occurrence, if it is one the page can show: a stored plan of this
    schedule, or its next occurrence (a preview)."""
    raw = request.POST.get("occurrence", "")
    try:
        occurrence = datetime.fromisoformat(raw)
    except ValueError:
        raise BadInput(f"{raw!r} is not an occurrence of {schedule}.") from None
    if timezone.is_naive(occurrence):
        raise BadInput(f"{raw!r} is not an occurrence of {schedule}.")
    stored = UpdatePlan.objects.filter(schedule=schedule, occurrence=occurrence).exists()
    if not stored and occurrence != occurrence_to_show(schedule, timezone.now()):
        raise BadInput(f"{schedule} has no plan for {timezone.localtime(occurrence):%Y-%m-%d %H:%M}.")
    return occurrence


def _entry(request: HttpRequest, schedule: UpdateSchedule, occurrence: datetime) -> PlanEntry:
    """The node's entry in the occurrence's plan, storing the plan if it was a preview."""
    node = request.POST.get("node", "")
    plan = plans.ensure_plan(schedule, occurrence)
    entry = (
        plan.entries.select_related("node", "plan").filter(node_id=node).first() if node.isdigit() else None
    )  # fmt: skip
    if entry is None:
        raise BadInput(f"No such node in the plan of {schedule} for {timezone.localtime(occurrence):%Y-%m-%d %H:%M}.")
    return entry


def parse_local(raw: str) -> datetime:
    """A datetime-local input's value, in the server's time zone."""
    try:
        naive = datetime.fromisoformat(raw)
    except ValueError:
        raise BadInput(f"{raw!r} is not a time: use YYYY-MM-DD HH:MM.") from None
    if timezone.is_aware(naive):
        raise BadInput(f"{raw!r}: give the time without a zone, in {timezone.get_default_timezone_name()}.")
    aware = timezone.make_aware(naive)
    if timezone.make_naive(aware) != naive:  # skipped by a change to summer time
        raise BadInput(f"{raw} does not exist in {timezone.get_default_timezone_name()} (a clock change).")
    return aware


def _change(model_admin: Any, request: HttpRequest, pk: int, change: Any) -> HttpResponse:
    """Run `change(schedule)` for a POST of group `update`; say what happened, or why not."""
    require(request, PERM)
    schedule = get_object_or_404(UpdateSchedule.objects.select_related("cluster"), pk=pk)
    if request.method != "POST":
        model_admin.message_user(request, "Changes to a plan are made with the page's buttons.", messages.ERROR)
        return _back(request, schedule)
    if schedule.cluster_id is None:
        model_admin.message_user(request, f"{schedule} is not a cluster schedule: it has no plan.", messages.ERROR)
        return _back(request, schedule)
    try:
        with transaction.atomic():  # a refusal leaves nothing behind, not even a plan stored for it
            done = change(schedule)
    except (plans.PlanRefused, BadInput) as exc:
        model_admin.message_user(request, str(exc), messages.ERROR)
    else:
        model_admin.message_user(request, done, messages.SUCCESS)
    return _back(request, schedule)


def move_view(model_admin: Any, request: HttpRequest, pk: int) -> HttpResponse:
    def change(schedule: UpdateSchedule) -> str:
        occurrence = _occurrence(request, schedule)
        when = parse_local(request.POST.get("planned_at", "").strip())
        entry = _entry(request, schedule, occurrence)
        plans.move(entry, when, request.user)
        return f"{entry.node} now updates at {timezone.localtime(when):%Y-%m-%d %H:%M:%S}."

    return _change(model_admin, request, pk, change)


def exclude_view(model_admin: Any, request: HttpRequest, pk: int) -> HttpResponse:
    def change(schedule: UpdateSchedule) -> str:
        occurrence = _occurrence(request, schedule)
        excluded = request.POST.get("excluded")
        if excluded not in ("1", "0"):
            raise BadInput("Say whether to leave the node out or put it back.")
        entry = _entry(request, schedule, occurrence)
        plans.set_excluded(entry, excluded == "1", request.user)
        return f"{entry.node} is {'left out of' if excluded == '1' else 'back in'} the plan."

    return _change(model_admin, request, pk, change)


def put_back_view(model_admin: Any, request: HttpRequest, pk: int) -> HttpResponse:
    """A node that left the schedule (its download failed twice) comes back, once its update lock is gone."""

    def change(schedule: UpdateSchedule) -> str:
        node = request.POST.get("node", "")
        left = (
            LeftSchedule.objects.select_related("node").filter(schedule=schedule, node_id=node).first()
            if node.isdigit()
            else None
        )
        if left is None:
            raise BadInput(f"No such node has left {schedule}.")
        if UpdateLock.objects.active().filter(node_id=left.node_id).exists():
            raise BadInput(f"{left.node} has an update lock: remove it first (the node's page).")
        record(Operation.SCHEDULE_REJOIN, schedule, user=request.user, node=left.node.hostname)
        left.delete()
        return f"{left.node} is back in {schedule}."

    return _change(model_admin, request, pk, change)
