"""Operator UI for hotfix notices. "Send notification" and "Resend failed" need the
permission hotfixes.send_hotfixnotice and answer 403 to anybody else, whether they
come as a changelist action or as a hand-made POST."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html_join

from audit.edits import AuditedAdmin
from audit.records import Operation
from hotfixes import services
from hotfixes.models import Contact, Delivery, HotfixNotice
from updates.admin import ReadOnlyAdmin

SEND_PERM = "hotfixes.send_hotfixnotice"
ROLE_ACTIONS = {"send_notification": SEND_PERM, "resend_failed": SEND_PERM}


def require(request: HttpRequest, perm: str) -> None:
    if not request.user.has_perm(perm):
        raise PermissionDenied(f"You need the permission {perm!r} for this.")


@admin.register(Contact)
class ContactAdmin(AuditedAdmin):
    audit_operations = (Operation.CONTACT_ADD, Operation.CONTACT_CHANGE, Operation.CONTACT_DELETE)
    list_display = ["name", "email", "phone", "wants_calls", "active"]
    list_filter = ["active", "wants_calls"]
    search_fields = ["name", "email", "phone"]
    filter_horizontal = ["nodes", "clusters"]


DELIVERY_COLUMNS = ("contact", "channel", "state", "attempts", "address", "provider_ref", "last_error", "updated_at")


class DeliveryInline(admin.TabularInline):
    model = Delivery
    extra = 0
    can_delete = False
    fields = DELIVERY_COLUMNS
    readonly_fields = DELIVERY_COLUMNS
    show_change_link = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Delivery]:
        return super().get_queryset(request).select_related("contact")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class HotfixNoticeForm(forms.ModelForm):
    class Meta:
        model = HotfixNotice
        fields = ["release", "title", "text", "urgency", "nodes", "clusters"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if not data.get("nodes") and not data.get("clusters"):
            raise forms.ValidationError("Choose the affected nodes or clusters.")
        return data


@admin.register(HotfixNotice)
class HotfixNoticeAdmin(admin.ModelAdmin):
    form = HotfixNoticeForm
    list_display = ["title", "release", "urgency", "created_at", "sent_at", "sent", "pending", "failed"]
    list_filter = ["urgency", "release"]
    list_select_related = ["release"]
    search_fields = ["title", "text", "release__version"]
    filter_horizontal = ["nodes", "clusters"]
    readonly_fields = ["created_at", "created_by", "sent_at", "nodes_running_hotfix"]
    fieldsets = [
        (None, {"fields": ["release", "title", "text", "urgency"]}),
        ("Affected systems", {"fields": ["nodes", "clusters", "nodes_running_hotfix"]}),
        ("History", {"fields": ["created_at", "created_by", "sent_at"]}),
    ]
    inlines = [DeliveryInline]
    actions = ["send_notification", "resend_failed"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[HotfixNotice]:
        def count(state: str) -> Count:
            return Count("deliveries", filter=Q(deliveries__state=state))

        return (
            super()
            .get_queryset(request)
            .annotate(
                n_sent=count(Delivery.State.SENT),
                n_pending=count(Delivery.State.PENDING) + count(Delivery.State.SENDING),
                n_failed=count(Delivery.State.FAILED),
            )
        )

    @admin.display(description="sent", ordering="n_sent")
    def sent(self, obj: Any) -> int:
        return obj.n_sent

    @admin.display(description="pending", ordering="n_pending")
    def pending(self, obj: Any) -> int:
        return obj.n_pending

    @admin.display(description="failed", ordering="n_failed")
    def failed(self, obj: Any) -> int:
        return obj.n_failed

    @admin.display(description="nodes already running the hotfix")
    def nodes_running_hotfix(self, obj: HotfixNotice) -> str:
        if not obj.pk:
            return "-"
        nodes = services.nodes_running_hotfix(obj)
        if not nodes:
            return "none"
        return format_html_join(", ", "{}", ((node.hostname,) for node in nodes))

    def save_model(self, request: HttpRequest, obj: HotfixNotice, form: Any, change: bool) -> None:
        if not change:
            obj.created_by = request.user  # type: ignore[assignment]
        super().save_model(request, obj, form, change)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        return {k: v for k, v in actions.items() if k not in ROLE_ACTIONS or request.user.has_perm(ROLE_ACTIONS[k])}

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        # With no visible action at all Django never reaches response_action and answers
        # 200 "no action selected"; a refused action must be a 403 in every case.
        if request.method == "POST" and request.POST.get("action") in ROLE_ACTIONS:
            require(request, ROLE_ACTIONS[request.POST["action"]])
        return super().changelist_view(request, extra_context)

    def response_action(self, request: HttpRequest, queryset: QuerySet[HotfixNotice]) -> HttpResponse | None:
        # A hidden action is still refused loudly: 403, not "no action selected".
        action = request.POST.get("action", "")
        if action in ROLE_ACTIONS:
            require(request, ROLE_ACTIONS[action])
        return super().response_action(request, queryset)

    @admin.action(description="Send notification")
    def send_notification(self, request: HttpRequest, queryset: QuerySet[HotfixNotice]) -> None:
        require(request, SEND_PERM)
        notices = list(queryset.select_related("release"))
        already = Delivery.objects.filter(notice__in=notices, state=Delivery.State.SENT).count()
        queued = sum(services.send_notification(notice) for notice in notices)
        self.message_user(
            request,
            f"Queued {queued} deliveries for {len(notices)} notice(s) ({already} already sent, nothing sent twice).",
            messages.SUCCESS if queued else messages.INFO,
        )

    @admin.action(description="Resend failed")
    def resend_failed(self, request: HttpRequest, queryset: QuerySet[HotfixNotice]) -> None:
        require(request, SEND_PERM)
        queued = sum(services.resend_failed(notice) for notice in queryset)
        self.message_user(request, f"Queued {queued} failed deliveries again.", messages.SUCCESS)


@admin.register(Delivery)
class DeliveryAdmin(ReadOnlyAdmin):
    """Written by the delivery task only: viewable, never edited by hand."""

    list_display = ["notice", "contact", "channel", "state", "attempts", "address", "provider_ref", "updated_at"]
    list_filter = ["state", "channel"]
    list_select_related = ["notice__release", "contact"]
    search_fields = ["contact__name", "address", "provider_ref", "notice__title"]
    readonly_fields = [
        "notice", "contact", "channel", "state", "attempts", "address", "provider_ref", "last_error",
        "created_at", "updated_at",
    ]  # fmt: skip
