"""The audit trail in the admin: read-only for everyone, searchable by node, cluster,
object and user name, filtered by action and date. Whoever has auditlog.view_logentry
sees it (groups update and maint: updates/roles.py)."""

from __future__ import annotations

from typing import Any

from auditlog.admin import LogEntryAdmin  # registers auditlog's own admin, which this one replaces
from auditlog.models import LogEntry
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from audit.records import Operation

# Shown in columns of their own, not among the details.
_COLUMNS = ("operation", "node", "cluster", "via", "os_user")


class OperationFilter(admin.SimpleListFilter):
    title = "action"
    parameter_name = "operation"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(Operation.choices)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(additional_data__operation=value) if value in Operation.values else queryset


class ExactFilter(admin.SimpleListFilter):
    """For links (a node's page to its rows, a row to its action's other rows): in the
    sidebar only while in use, to be seen and cleared."""

    lookup = ""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        value = self.value()
        return [(value, value)] if value else []

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(**{self.lookup: value}) if value else queryset


class NodeFilter(ExactFilter):
    title = parameter_name = "node"
    lookup = "additional_data__node"


class ClusterFilter(ExactFilter):
    title = parameter_name = "cluster"
    lookup = "additional_data__cluster"


class ActionFilter(ExactFilter):
    """The rows of one request or command: a bulk action's nodes."""

    title = parameter_name = "cid"
    lookup = "cid"


admin.site.unregister(LogEntry)


@admin.register(LogEntry)
class AuditTrailAdmin(LogEntryAdmin):
    list_display = ["created", "operation", "node", "cluster", "user", "remote_addr", "resource_url", "summary"]
    list_display_links = ["created"]
    list_filter = [OperationFilter, ("timestamp", admin.DateFieldListFilter), NodeFilter, ClusterFilter, ActionFilter]
    # The row's object and user in the same query: the page costs the same queries for 3 rows as for 100.
    list_select_related = ["content_type", "actor"]
    search_fields = ["object_repr", "additional_data__node", "additional_data__cluster", "actor__username"]
    search_help_text = "Node, cluster, object or user name."
    date_hierarchy = None  # its list of years reads every row
    show_facets = admin.ShowFacets.NEVER  # a count per action over every row's JSON
    actions = None
    fieldsets = [
        (None, {"fields": ["created", "user", "remote_addr", "operation", "node", "cluster", "resource_url",
                           "same_action"]}),
        ("What happened", {"fields": ["details", "msg"]}),
    ]  # fmt: skip
    readonly_fields = [
        "created", "user", "remote_addr", "operation", "node", "cluster", "resource_url", "same_action", "details",
        "msg",
    ]  # fmt: skip

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the trail stays, for superusers too

    @admin.display(description="action")
    def operation(self, obj: LogEntry) -> str:
        value = _data(obj).get("operation", "")
        return Operation(value).label if value in Operation.values else obj.get_action_display()

    @admin.display(description="node")
    def node(self, obj: LogEntry) -> str:
        return _data(obj).get("node", "")

    @admin.display(description="cluster")
    def cluster(self, obj: LogEntry) -> str:
        return _data(obj).get("cluster", "")

    @admin.display(description="user", ordering="actor__username")
    def user(self, obj: LogEntry) -> str:
        """The operator; a command run without --user: the OS user and the command."""
        if obj.actor is not None:
            return obj.actor.get_username()
        data = _data(obj)
        return f"{data['os_user']} ({data['via']})" if data.get("via") else "-"

    @admin.display(description="what")
    def summary(self, obj: LogEntry) -> str:
        if obj.changes_dict:
            return ", ".join(obj.changes_dict)
        text = ", ".join(f"{key}: {value}" for key, value in _details(obj))
        return text if len(text) <= 100 else text[:99] + "\u2026"

    @admin.display(description="details")
    def details(self, obj: LogEntry) -> str:
        return format_html_join("", "<div><b>{}</b>: {}</div>", _details(obj)) or "-"

    @admin.display(description="the same action")
    def same_action(self, obj: LogEntry) -> str:
        if not obj.cid:
            return "-"
        url = reverse("admin:auditlog_logentry_changelist") + f"?cid={obj.cid}"
        return format_html('<a href="{}">every row of this request or command</a>', url)


def _data(obj: LogEntry) -> dict[str, Any]:
    return obj.additional_data if isinstance(obj.additional_data, dict) else {}


def _details(obj: LogEntry) -> list[tuple[str, Any]]:
    return [(key, value) for key, value in _data(obj).items() if key not in _COLUMNS]
