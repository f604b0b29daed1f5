from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse

from nodes.admin import refuse_hidden_action, require
from updates import workflow
from updates.models import MaintenanceNotice, Package, Release, UpdateLock, UpdateRun, UpdateStep


class PackageInline(admin.TabularInline):
    model = Package
    extra = 0
    fields = ["name", "version", "file", "size", "sha256"]


@admin.register(Release)
class ReleaseAdmin(admin.ModelAdmin):
    list_display = ["version", "channel", "needs_reboot", "hotfix", "index_serial", "created_at"]
    list_filter = ["channel", "hotfix"]
    search_fields = ["version", "notes"]
    readonly_fields = ["index_serial", "created_at"]
    inlines = [PackageInline]


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by the workflow only: viewable, never edited by hand."""

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
        "current_step",
        "started_by",
        "created_at",
        "finished_at",
    ]
    list_filter = ["state", "trigger", "node__cluster"]
    list_select_related = ["node", "release", "started_by"]
    search_fields = ["node__hostname", "release__version"]
    date_hierarchy = "created_at"
    change_form_template = "admin/updates/updaterun/change_form.html"
    readonly_fields = [
        "node", "release", "packages", "trigger", "state", "started_by", "message", "current_step",
        "version_before", "boot_id_before", "created_at", "last_activity_at", "finished_at", "error",
    ]  # fmt: skip

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None):  # type: ignore[no-untyped-def]
        steps = UpdateStep.objects.filter(run_id=int(object_id)).order_by("position")
        return super().change_view(request, object_id, form_url, {"steps": steps, **(extra_context or {})})


@admin.register(UpdateLock)
class UpdateLockAdmin(ReadOnlyAdmin):
    list_display = ["node", "created_at", "reason", "run", "removed_at", "removed_by"]
    list_filter = [("removed_at", admin.EmptyFieldListFilter)]
    list_select_related = ["node", "run", "removed_by"]
    readonly_fields = ["node", "reason", "run", "created_at", "removed_at", "removed_by"]
    actions = ["remove"]

    @admin.action(description="Remove update lock")
    def remove(self, request: HttpRequest, queryset: QuerySet[UpdateLock]) -> None:
        require(request, "nodes.remove_update_lock")
        removed = sum(workflow.remove_lock(lock.node, request.user) for lock in queryset.filter(removed_at=None))
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
    list_display = ["created_at", "node", "cluster", "starts_at", "message", "created_by"]
    list_select_related = ["node", "cluster", "created_by"]
    readonly_fields = ["node", "cluster", "message", "starts_at", "created_at", "created_by"]
