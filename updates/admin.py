from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any, cast

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone

from audit.edits import AuditedAdmin, form_changes
from audit.records import Operation, record
from nodes.admin import refuse_hidden_action, require
from updates import announced, plan_views, rollout_views, run_page
from updates.models import (
    MaintenanceNotice,
    Package,
    Release,
    Rollout,
    UpdateLock,
    UpdateLockQuerySet,
    UpdateRun,
    UpdateRunQuerySet,
    UpdateSchedule,
)
from updates.runs import rollouts
from updates.runs.locks import remove_lock
from updates.schedules import set_time_control, upcoming, zone


class PackageInline(admin.TabularInline):
    model = Package
    extra = 0
    fields = ["name", "version", "file", "size", "sha256"]


class WithdrawnFilter(admin.SimpleListFilter):
    title = "in the repository"
    parameter_name = "withdrawn"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("no", "listed"), ("yes", "withdrawn")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "yes":
            return queryset.exclude(withdrawn_at=None)
        if self.value() == "no":
            return queryset.filter(withdrawn_at=None)
        return queryset


@admin.register(Release)
class ReleaseAdmin(admin.ModelAdmin):
    list_display = ["version", "channel", "needs_reboot", "hotfix", "index_serial", "withdrawn", "created_at"]
    list_filter = ["channel", "hotfix", WithdrawnFilter]
    search_fields = ["version", "notes"]
    readonly_fields = ["index_serial", "withdrawn_at", "created_at"]

    @admin.display(description="withdrawn", ordering="withdrawn_at")
    def withdrawn(self, obj: Release) -> str:
        """A release the repository no longer lists: never the newest, never installed."""
        return f"withdrawn {timezone.localtime(obj.withdrawn_at):%Y-%m-%d %H:%M}" if obj.withdrawn_at else ""

    inlines = [PackageInline]


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by updates.runs only: viewable, never edited by hand."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(UpdateRun)
class UpdateRunAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "node",
        "release",
        "trigger",
        "state",
        "current",
        "started_by",
        "created_at",
        "finished_at",
    ]
    list_filter = ["state", "trigger", "node__cluster"]
    # Not list_select_related: with the joins, SQLite's planner starts from the nodes
    # and sorts every run for each page (130-200 ms at 200,000 runs). Alone, the page
    # of runs walks the created_at index and stops after 100; its nodes, releases and
    # users follow in one query each (prefetch: the count stays flat).
    list_select_related = ()
    search_fields = ["node__hostname", "release__version"]
    # No date_hierarchy: its distinct-years query scans every run (891 ms at 200,000 runs).
    change_form_template = "admin/updates/updaterun/change_form.html"
    readonly_fields = [
        "node", "release", "packages", "trigger", "state", "started_by", "message", "current_step",
        "version_before", "boot_id_before", "created_at", "last_activity_at", "finished_at", "error",
    ]  # fmt: skip

    def get_queryset(self, request: HttpRequest) -> QuerySet[UpdateRun]:
        runs = super().get_queryset(request).prefetch_related("node", "release", "started_by")
        return cast(UpdateRunQuerySet, runs).with_current_step()

    @admin.display(description="current step", ordering="current_step")
    def current(self, obj: UpdateRun) -> str:
        return obj.current_step

    def get_urls(self) -> list[Any]:
        progress = self.admin_site.admin_view(self.progress_view)
        return [path("<int:pk>/progress/", progress, name="updates_updaterun_progress"), *super().get_urls()]

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None):  # type: ignore[no-untyped-def]
        rows = run_page.step_rows(int(object_id)) if object_id.isdigit() else []
        return super().change_view(request, object_id, form_url, {"step_rows": rows, **(extra_context or {})})

    def progress_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """The run's state and steps as an HTML fragment, for the run page's script."""
        # One query for the run, its node and release: every open run page asks every 2 s.
        run = UpdateRun.objects.select_related("node", "release").filter(pk=pk).first()
        if run is None:
            raise Http404("No such run.")
        if not self.has_view_permission(request, run):
            raise PermissionDenied
        context = {"run": run, "step_rows": run_page.step_rows(run.pk)}
        return TemplateResponse(request, "admin/updates/updaterun/progress.html", context)


@admin.register(UpdateLock)
class UpdateLockAdmin(ReadOnlyAdmin):
    list_display = ["node", "created_at", "reason", "run", "removed_at", "removed_by"]
    list_filter = [("removed_at", admin.EmptyFieldListFilter)]
    list_select_related = ["node", "run__node", "run__release", "removed_by"]  # a run names its node and release
    readonly_fields = ["node", "reason", "run", "created_at", "removed_at", "removed_by"]
    actions = ["remove"]

    @admin.action(description="Remove update lock")
    def remove(self, request: HttpRequest, queryset: QuerySet[UpdateLock]) -> None:
        require(request, "nodes.remove_update_lock")
        active = cast(UpdateLockQuerySet, queryset).active()
        removed = sum(remove_lock(lock.node, request.user) for lock in active)
        self.message_user(request, f"Removed {removed} update lock(s).", messages.SUCCESS)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        if not request.user.has_perm("nodes.remove_update_lock"):
            actions.pop("remove", None)
        return actions

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        refuse_hidden_action(request, {"remove": "nodes.remove_update_lock"})
        return super().changelist_view(request, extra_context)


@admin.register(MaintenanceNotice)
class MaintenanceNoticeAdmin(ReadOnlyAdmin):
    """Notices and announced updates ("announce now, update at"): pending ones start at
    their time (updates.announced); a member of group update may cancel them before."""

    list_display = ["created_at", "node", "cluster", "starts_at", "release", "state", "run", "outcome", "created_by"]
    list_filter = ["state", "node__cluster"]
    list_select_related = ["node", "cluster", "created_by", "release", "run"]
    search_fields = ["node__hostname", "message"]
    readonly_fields = [
        "node", "cluster", "message", "starts_at", "release", "state", "run", "outcome", "decided_at", "created_at",
        "created_by",
    ]  # fmt: skip
    actions = ["cancel"]

    @admin.action(description="Cancel (users are told that it is off)")
    def cancel(self, request: HttpRequest, queryset: QuerySet[MaintenanceNotice]) -> None:
        require(request, "nodes.start_update")
        chosen = list(queryset.select_related("node", "cluster"))
        done = announced.cancel(chosen, request.user)
        self.message_user(request, f"Cancelled {done} of {len(chosen)} announcement(s).", messages.SUCCESS)
        if done < len(chosen):
            self.message_user(
                request, "Started, refused or cancelled ones, and notices whose time has passed, stay as they are.",
                messages.WARNING,
            )  # fmt: skip

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        if not request.user.has_perm("nodes.start_update"):
            actions.pop("cancel", None)
        return actions

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        refuse_hidden_action(request, {"cancel": "nodes.start_update"})
        return super().changelist_view(request, extra_context)


@admin.register(UpdateSchedule)
class UpdateScheduleAdmin(AuditedAdmin):
    audit_operations = (Operation.SCHEDULE_ADD, Operation.SCHEDULE_CHANGE, Operation.SCHEDULE_DELETE)
    list_display = ["name", "target", "window", "next_update", "time_control", "last_checked_at", "last_result"]
    list_filter = ["time_control"]
    list_select_related = ["node", "cluster"]
    readonly_fields = ["disabled_reason", "last_checked_at", "last_result", "next_update", "next_occurrences"]
    fields = [
        "name", "node", "cluster", "cron", "run_at", "timezone", "download_lead", "download_cron", "download_only",
        "time_control", "disabled_reason", "next_update", "next_occurrences", "last_checked_at", "last_result",
    ]  # fmt: skip
    actions = ["switch_on", "switch_off"]
    change_form_template = "admin/updates/updateschedule/change_form.html"

    def get_urls(self) -> list[Any]:
        wrap = self.admin_site.admin_view
        views = [("move", plan_views.move_view), ("exclude", plan_views.exclude_view),
                 ("put-back", plan_views.put_back_view)]  # fmt: skip
        return [
            *(path(f"<int:pk>/plan/{name}/", wrap(partial(view, self)), name=f"updates_updateschedule_plan_{name}")
              for name, view in views),
            *super().get_urls(),
        ]  # fmt: skip

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None):  # type: ignore[no-untyped-def]
        found = UpdateSchedule.objects.select_related("cluster").filter(pk=object_id) if object_id.isdigit() else None
        schedule = found.first() if found is not None else None
        extra = {
            "plan": plan_views.plan_for(schedule) if schedule and schedule.cluster_id else None,
            "can_plan": request.user.has_perm(plan_views.PERM),
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, extra)

    @admin.display(description="for")
    def target(self, obj: UpdateSchedule) -> str:
        return f"cluster {obj.cluster}" if obj.cluster_id else f"{obj.node}"

    @admin.display(description="window")
    def window(self, obj: UpdateSchedule) -> str:
        return f"{obj.cron} ({obj.timezone})" if obj.cron else f"once, {timezone.localtime(obj.run_at):%Y-%m-%d %H:%M}"

    @admin.display(description="next update")
    def next_update(self, obj: UpdateSchedule) -> str:
        if not obj.pk or not obj.time_control:
            return "-"
        pairs = upcoming(obj, timezone.now(), 1)
        moment = pairs[0][1] or pairs[0][0] if pairs else None
        return f"{timezone.localtime(moment):%Y-%m-%d %H:%M}" if moment else "-"

    @admin.display(description="next occurrences")
    def next_occurrences(self, obj: UpdateSchedule) -> str:
        """The instants it fires at, in its own zone with the offset: what daylight saving does shows here."""
        if not obj.pk:
            return "-"
        tz = zone(obj.timezone)

        def local(moment: datetime | None) -> str:
            return f"{moment.astimezone(tz):%Y-%m-%d %H:%M %Z (UTC%z)}" if moment else "none"

        rows = [
            f"download {local(download)}" + (f" \u2192 update {local(update)}" if update else "")
            for download, update in upcoming(obj, timezone.now(), 6)
        ]
        return "\n".join(rows) or "-"

    def save_model(self, request: HttpRequest, obj: UpdateSchedule, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        for warning in cap_warnings(obj):
            self.message_user(request, warning, messages.WARNING)

    @admin.action(description="Switch time control on")
    def switch_on(self, request: HttpRequest, queryset: QuerySet[UpdateSchedule]) -> None:
        require(request, "nodes.start_update")
        self.message_user(request, f"Time control on for {set_time_control(queryset, True)} schedule(s).")

    @admin.action(description="Switch time control off")
    def switch_off(self, request: HttpRequest, queryset: QuerySet[UpdateSchedule]) -> None:
        require(request, "nodes.start_update")
        self.message_user(request, f"Time control off for {set_time_control(queryset, False)} schedule(s).")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("nodes.start_update")

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("nodes.start_update")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm("nodes.start_update")


def cap_warnings(schedule: UpdateSchedule) -> list[str]:
    """The manual's "Achtung": never more nodes of a cluster updating at once than allowed."""
    if not schedule.cluster_id:
        return []
    cluster = schedule.cluster
    assert cluster is not None
    warnings = []
    count = cluster.nodes.count()
    if count > cluster.max_parallel_updates:
        warnings.append(
            f"{cluster} has {count} nodes and allows {cluster.max_parallel_updates} at a time: the others wait for a "
            "slot, so the update takes longer than the window. For complex clusters, plan it with m-privacy's "
            "technical customer service."
        )
    others = UpdateSchedule.objects.filter(cluster=cluster, time_control=True).exclude(pk=schedule.pk)
    if schedule.time_control and others.exists():
        names = ", ".join(o.name for o in others)
        warnings.append(f"{cluster} has other active schedules ({names}): they share its update slots.")
    return warnings


@admin.register(Rollout)
class RolloutAdmin(admin.ModelAdmin):
    """The runs of one start of several nodes, or of a cluster schedule's occurrence: its
    page shows their progress and picture, and group `update` pauses, resumes or cancels
    it there (updates/rollout_views.py). Only its failure threshold is edited here; its
    state changes in updates/runs/rollouts.py only."""

    list_display = ["id", "title", "shown_state", "progress", "created_by", "created_at"]
    list_filter = ["state"]
    search_fields = ["title"]
    fields = [
        "title", "failure_threshold", "failure_threshold_unit", "state_reason", "state_changed_at", "state_changed_by",
        "cluster", "schedule", "scheduled_for", "created_by", "created_at",
    ]  # fmt: skip
    readonly_fields = [
        "title", "state_reason", "state_changed_at", "state_changed_by", "cluster", "schedule", "scheduled_for",
        "created_by", "created_at",
    ]  # fmt: skip
    change_form_template = "admin/updates/rollout/change_form.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Rollout]:
        return super().get_queryset(request).with_progress().select_related("created_by")  # type: ignore[attr-defined]

    @admin.display(description="state")
    def shown_state(self, obj: Rollout) -> str:
        return obj.get_shown_state_display()

    @admin.display(description="progress")
    def progress(self, obj: Rollout) -> str:
        p = obj.progress
        return (
            f"{p.done} done, {p.running} running, {p.waiting} waiting, {p.failed} failed, {p.cancelled} cancelled "
            f"of {p.total}"
        )

    def get_urls(self) -> list[Any]:
        wrap = self.admin_site.admin_view
        views = [("pause", rollout_views.pause_view), ("resume", rollout_views.resume_view),
                 ("cancel", rollout_views.cancel_view)]  # fmt: skip
        return [
            *(path(f"<int:pk>/{name}/", wrap(partial(view, self)), name=f"updates_rollout_{name}")
              for name, view in views),
            *super().get_urls(),
        ]  # fmt: skip

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None):  # type: ignore[no-untyped-def]
        extra = {
            "page": rollout_views.rollout_page(int(object_id)) if object_id.isdigit() else None,
            "can_act": request.user.has_perm(rollout_views.PERM),
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, extra)

    def save_model(self, request: HttpRequest, obj: Rollout, form: Any, change: bool) -> None:
        # Only the threshold: a full save would write back a state read before a pause.
        obj.save(update_fields=["failure_threshold", "failure_threshold_unit"])
        changes = form_changes(form, added=False)
        if changes:
            record(Operation.ROLLOUT_CHANGE, obj, user=request.user, changes=changes)
        rollouts.pause_on_failures(obj.pk)  # a lowered threshold may be reached already

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # made when runs start together

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.has_perm(rollout_views.PERM)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the history stays
