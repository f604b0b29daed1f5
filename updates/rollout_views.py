"""A rollout's page (`rollout_page`: progress, the picture of its nodes, its runs) and
the operator's actions on it (group `update`, POST only): pause, resume, cancel the
nodes not yet started. Each answers with a redirect and a message; a refused one
changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import SafeString

from nodes.admin import require
from nodes.models import Node
from updates import plans
from updates.models import Rollout, UpdateRun, UpdateRunQuerySet
from updates.placement import Bounds
from updates.runs import rollouts
from updates.timeline import actual_of, actual_times, timeline_svg

PERM = "nodes.start_update"


@dataclass(frozen=True)
class Unplanned:
    """A node of a rollout started by hand, for the picture: no plan, only what happened."""

    node: Node
    node_id: int
    excluded: bool = False
    note: str = ""
    out_at: datetime | None = None
    planned_at: datetime | None = None
    back_at: datetime | None = None


@dataclass(frozen=True)
class Picture:
    """What timeline_svg draws: the bounds and one entry per node (updates.plans.Preview's shape)."""

    schedule: str
    bounds: Bounds
    entries: list[Any] = field(default_factory=list)


@dataclass
class RolloutPage:
    rollout: Rollout
    runs: list[UpdateRun]
    svg: SafeString

    @property
    def can_pause(self) -> bool:
        return self.rollout.shown_state == Rollout.State.RUNNING

    @property
    def can_resume(self) -> bool:
        return self.rollout.shown_state == Rollout.State.PAUSED

    @property
    def can_cancel(self) -> bool:
        return self.rollout.shown_state in (Rollout.State.RUNNING, Rollout.State.PAUSED)


def rollout_page(rollout_id: int, now: datetime | None = None) -> RolloutPage | None:
    """Everything the page shows: a fixed number of queries however many nodes."""
    now = now or timezone.now()
    found = Rollout.objects.with_progress().select_related("schedule__cluster", "cluster").filter(pk=rollout_id)
    rollout = found.first()
    if rollout is None:
        return None
    runs = cast(UpdateRunQuerySet, rollout.runs.select_related("node", "release")).with_current_step()
    shown = list(runs.order_by("node__hostname"))
    return RolloutPage(rollout, shown, _picture(rollout, shown, now))


def _picture(rollout: Rollout, runs: list[UpdateRun], now: datetime) -> SafeString:
    schedule = rollout.schedule
    element = f"rollout-{rollout.pk}"
    if schedule is not None and schedule.cluster_id and rollout.scheduled_for is not None:
        # A cluster schedule's occurrence: its plan, as the schedule's page shows it.
        preview = plans.preview(schedule, rollout.scheduled_for)
        return timeline_svg(preview, actual_times(schedule.pk, rollout.scheduled_for), now, id_prefix=element)
    cluster = rollout.cluster
    cap = cluster.max_parallel_updates if cluster else len(runs)
    out_bound = cluster.out_of_lb_bound if cluster else len(runs)
    picture = Picture(
        str(rollout), Bounds(rollout.created_at, timedelta(0), max(cap, 1), max(out_bound, 1)),
        [Unplanned(run.node, run.node_id) for run in runs],
    )  # fmt: skip
    caption = f"{rollout}: {len(runs)} node(s), started {timezone.localtime(rollout.created_at):%Y-%m-%d %H:%M} (T)."
    return timeline_svg(picture, actual_of(rollout.runs.all()), now, id_prefix=element, caption=caption)


# --- the operator's actions ---------------------------------------------------------------------


def _act(model_admin: Any, request: HttpRequest, pk: int, act: Callable[[Rollout], str]) -> HttpResponse:
    """Run `act(rollout)` for a POST of group `update`; say what happened, or why not."""
    require(request, PERM)
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    rollout = get_object_or_404(Rollout, pk=pk)
    try:
        done = act(rollout)
    except rollouts.RolloutRefused as exc:
        model_admin.message_user(request, str(exc), messages.ERROR)
    else:
        model_admin.message_user(request, done, messages.SUCCESS)
    return HttpResponseRedirect(reverse("admin:updates_rollout_change", args=[pk]))


def pause_view(model_admin: Any, request: HttpRequest, pk: int) -> HttpResponse:
    def act(rollout: Rollout) -> str:
        rollouts.pause(rollout.pk, request.user)
        return f"Paused the {rollout}: no more of its nodes start; the ones updating finish."

    return _act(model_admin, request, pk, act)


def resume_view(model_admin: Any, request: HttpRequest, pk: int) -> HttpResponse:
    def act(rollout: Rollout) -> str:
        rollouts.resume(rollout.pk, request.user)
        return f"Resumed the {rollout}: its waiting nodes start again."

    return _act(model_admin, request, pk, act)


def cancel_view(model_admin: Any, request: HttpRequest, pk: int) -> HttpResponse:
    def act(rollout: Rollout) -> str:
        cancelled = rollouts.cancel(rollout.pk, request.user)
        return f"Cancelled the {rollout}: {cancelled} node(s) not yet started were called off."

    return _act(model_admin, request, pk, act)
