"""The operator's UI for the fleet. Role-bound actions (groups ``update`` and
``maint``) answer 403 to anybody else, whether they come as a changelist action
or as a direct request to the action's page."""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Any, cast

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Count, Exists, OuterRef, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from audit.edits import AuditedAdmin
from audit.records import Operation
from nodes import keys, services
from nodes.models import Cluster, Node, NodeKey, NodeQuerySet
from updates import announced, overview
from updates.models import MaintenanceNotice, Release, UpdateLock
from updates.runs.cluster_cap import cluster_slots, wake_waiters
from updates.runs.start import UpdateRefused

ROLE_ACTIONS = {
    "autoupdate": "nodes.start_update",
    "catchup": "nodes.start_update",
    "remove_update_lock": "nodes.remove_update_lock",
    "end_maintenance": "nodes.end_maintenance",
    "announce_maintenance": "nodes.start_update",
}


def require(request: HttpRequest, perm: str) -> None:
    if not request.user.has_perm(perm):
        raise PermissionDenied(f"You need the permission {perm!r} for this.")


def refuse_hidden_action(request: HttpRequest, role_actions: dict[str, str]) -> None:
    """A role action posted by somebody without the role is refused loudly (403),
    not answered with Django's "no action selected"."""
    action = request.POST.get("action", "") if request.method == "POST" else ""
    if action in role_actions:
        require(request, role_actions[action])


@admin.register(Cluster)
class ClusterAdmin(AuditedAdmin):
    audit_operations = (Operation.CLUSTER_ADD, Operation.CLUSTER_CHANGE, Operation.CLUSTER_DELETE)
    list_display = ["name", "max_parallel_updates", "lb_lead_time", "node_count"]
    search_fields = ["name"]
    change_form_template = "admin/nodes/cluster/change_form.html"

    def get_urls(self) -> list[Any]:
        wrap = self.admin_site.admin_view
        view = wrap(self.release_slot_view)
        return [path("<int:pk>/release-slot/", view, name="nodes_cluster_release_slot"), *super().get_urls()]

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None):  # type: ignore[no-untyped-def]
        from updates import plan_views  # the updates app builds on this one: imported when used

        cluster = Cluster.objects.filter(pk=object_id).first() if object_id.isdigit() else None
        schedules = cluster.schedules.select_related("cluster").order_by("name") if cluster else []
        extra = {
            "slot_holders": cluster_slots().holders(cluster.name) if cluster else [],
            "can_release": request.user.has_perm("nodes.start_update"),
            "plans": [plan_views.plan_for(schedule) for schedule in schedules],
            "can_plan": request.user.has_perm(plan_views.PERM),
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, extra)

    def release_slot_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """For a holder that is gone: its slot would otherwise stay taken for good."""
        require(request, "nodes.start_update")
        cluster = get_object_or_404(Cluster, pk=pk)
        node = request.POST.get("node", "")
        if request.method == "POST" and node and services.force_release_slot(cluster, node, request.user):
            self.message_user(request, f"Released the update slot of {node} in {cluster}.", messages.SUCCESS)
        return HttpResponseRedirect(reverse("admin:nodes_cluster_change", args=[pk]))

    def save_model(self, request: HttpRequest, obj: Cluster, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if change and "max_parallel_updates" in form.changed_data:
            # A raised cap lets waiting nodes go on now, not on the reconciler's next round.
            transaction.on_commit(partial(wake_waiters, obj))

    def get_queryset(self, request: HttpRequest) -> QuerySet[Cluster]:
        return super().get_queryset(request).annotate(node_count=Count("nodes"))

    @admin.display(description="nodes", ordering="node_count")
    def node_count(self, obj: Any) -> int:
        return obj.node_count


class AnnounceForm(forms.Form):
    message = forms.CharField(widget=forms.Textarea(attrs={"rows": 4, "cols": 80}), max_length=2000)
    starts_at = forms.DateTimeField(help_text="When the maintenance work begins (default: in 2 hours).")

    def clean_starts_at(self) -> Any:
        value = self.cleaned_data["starts_at"]
        if value < timezone.now():
            raise forms.ValidationError("The start lies in the past.")
        return value


class UpdateAtForm(forms.Form):
    """The Auto-Update's "announce now, update at": the manual's step 1, about 2 hours ahead."""

    update_at = forms.DateTimeField(
        label="Update at", help_text="Users are told now; the update starts then (default: in 2 hours)."
    )
    message = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80}), max_length=2000, required=False,
        help_text="Optional; {when} is replaced by the time in each appliance's zone. Default: names the version.",
    )  # fmt: skip

    def clean_update_at(self) -> Any:
        value = self.cleaned_data["update_at"]
        try:
            announced.check_update_time(value)
        except UpdateRefused as exc:
            raise forms.ValidationError(str(exc)) from None
        return value


class CatchupForm(forms.Form):
    mode = forms.ChoiceField(
        choices=[("full", "Full update from Oldstable"), ("partial", "Partial update from Oldstable")],
        widget=forms.RadioSelect,
        initial="partial",
    )
    packages = forms.MultipleChoiceField(required=False, widget=forms.CheckboxSelectMultiple)

    def __init__(self, *args: Any, release: Release | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        packages = release.packages.all() if release else []
        field = self.fields["packages"]
        assert isinstance(field, forms.MultipleChoiceField)
        field.choices = [(p.name, f"{p.name} {p.version}") for p in packages]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("mode") == "partial" and not data.get("packages"):
            raise forms.ValidationError("Choose the packages for a partial update.")
        return data


class StatusFilter(admin.SimpleListFilter):
    """Node.status, which is derived, never stored."""

    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(Node.Status.choices)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Node]) -> QuerySet[Node]:
        value = self.value()
        return cast(NodeQuerySet, queryset).in_status(value) if value in Node.Status.values else queryset


class StateFilter(admin.SimpleListFilter):
    """The states of the fleet overview (the admin's home page) that no other filter
    here covers, by the overview's own conditions: its counts are the counts of these lists."""

    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(overview.NodeState.choices)

    def queryset(self, request: HttpRequest, queryset: QuerySet[Node]) -> QuerySet[Node]:
        value = self.value()
        if value not in overview.NodeState.values:
            return queryset
        return overview.nodes_in_state(queryset, value, timezone.now())


class InstalledVersionFilter(admin.SimpleListFilter):
    """Versions in their order, not as text (2.10.0 before 2.9.0), and a name for none."""

    title = "installed version"
    parameter_name = "installed_version"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        found = Node.objects.values_list("installed_version", flat=True).distinct().order_by()
        return [(version, version or "none reported") for version in overview.newest_first(found)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Node]) -> QuerySet[Node]:
        value = self.value()
        return queryset if value is None else queryset.filter(installed_version=value)


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = [
        "hostname", "cluster", "installed_version", "status", "maintenance_mode", "appliance_maintenance",
        "logon_enabled", "in_load_balancer", "users", "locked", "last_seen",
    ]  # fmt: skip
    list_filter = ["cluster", StatusFilter, StateFilter, "maintenance_mode", "channel", InstalledVersionFilter]
    list_select_related = ["cluster"]
    search_fields = ["hostname"]
    readonly_fields = [
        "installed_version", "installed_packages", "logged_in_users", "logon_enabled", "in_load_balancer",
        "boot_id", "agent_instance", "last_seen", "status", "maintenance_mode", "appliance_maintenance",
        "maintenance_reason",
    ]  # fmt: skip
    actions = ["autoupdate", "catchup", "announce_maintenance", "remove_update_lock", "end_maintenance"]
    change_form_template = "admin/nodes/node/change_form.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Node]:
        active = UpdateLock.objects.active().filter(node=OuterRef("pk"))
        return cast(NodeQuerySet, super().get_queryset(request)).with_status().annotate(has_lock=Exists(active))

    @admin.display(boolean=True, description="update lock", ordering="has_lock")
    def locked(self, obj: Any) -> bool:
        return obj.has_lock

    @admin.display(description="status")
    def status(self, obj: Node) -> str:
        return obj.get_status_display()

    @admin.display(description="appliance reports")
    def appliance_maintenance(self, obj: Node) -> str:
        """The appliance's own word on its maintenance mode, marked where it is not the
        database's (maintenance_mode): a step under way, or an appliance changed by hand."""
        if obj.reported_maintenance is None:
            return "-"
        said = f"maintenance {'on' if obj.reported_maintenance else 'off'}"
        if obj.reported_maintenance == obj.maintenance_mode:
            return said
        decided = "on" if obj.maintenance_mode else "off"
        return format_html(
            '<span class="maintenance-differs" title="tgpadmin has maintenance mode {}">&#9888; {}</span>',
            decided,
            said,
        )

    @admin.display(description="logged-in users")
    def users(self, obj: Node) -> int:
        return len(obj.logged_in_users)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        return {k: v for k, v in actions.items() if k not in ROLE_ACTIONS or request.user.has_perm(ROLE_ACTIONS[k])}

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        refuse_hidden_action(request, ROLE_ACTIONS)
        return super().changelist_view(request, extra_context)

    def get_urls(self) -> list[Any]:
        wrap = self.admin_site.admin_view
        return [
            path("autoupdate/", wrap(self.autoupdate_view), name="nodes_node_autoupdate"),
            path("announce/", wrap(self.announce_view), name="nodes_node_announce"),
            path("<int:pk>/remove-lock/", wrap(self.remove_lock_view), name="nodes_node_remove_lock"),
            path("<int:pk>/catchup/", wrap(self.catchup_view), name="nodes_node_catchup"),
            path("<int:pk>/end-maintenance/", wrap(self.end_maintenance_view), name="nodes_node_end_maintenance"),
            path("<int:pk>/accept-key/", wrap(self.accept_key_view), name="nodes_node_accept_key"),
            path("<int:pk>/revoke-key/", wrap(self.revoke_key_view), name="nodes_node_revoke_key"),
            *super().get_urls(),
        ]

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None):  # type: ignore[no-untyped-def]
        extra = {
            "lock": UpdateLock.objects.active().filter(node_id=object_id).first(),
            "lock_history": UpdateLock.objects.filter(node_id=object_id, removed_at__isnull=False).select_related(
                "removed_by"
            )[:10],
            "recent_runs": services.recent_runs(object_id),
            "can_update": request.user.has_perm("nodes.start_update"),
            "announcements": MaintenanceNotice.objects.pending()
            .filter(node_id=object_id)
            .select_related("release", "created_by"),
            "can_unlock": request.user.has_perm("nodes.remove_update_lock"),
            "can_end_maintenance": request.user.has_perm("nodes.end_maintenance"),
            "node_keys": NodeKey.objects.filter(node_id=object_id).select_related("decided_by")[:20],
            "can_manage_keys": request.user.has_perm("nodes.manage_node_keys"),
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, extra)

    # --- actions: each hands over to a page or a service and reports counts ---

    # The Auto-Update and announce actions answer with their page itself, as Django's
    # delete action does, not with a redirect that carries the selection in its URL:
    # "select all" over a large fleet would make a URL longer than proxies accept.

    @admin.action(description="Auto-Update (asks for confirmation)")
    def autoupdate(self, request: HttpRequest, queryset: QuerySet[Node]) -> HttpResponse:
        return self._autoupdate_page(request, list(queryset.select_related("cluster")))

    @admin.action(description="Catch up from Oldstable (full or partial update)")
    def catchup(self, request: HttpRequest, queryset: QuerySet[Node]) -> HttpResponse | None:
        if queryset.count() != 1:
            self.message_user(request, "Choose exactly one node to catch up from Oldstable.", messages.WARNING)
            return None
        return HttpResponseRedirect(reverse("admin:nodes_node_catchup", args=[queryset.get().pk]))

    @admin.action(description="Announce maintenance to logged-in users")
    def announce_maintenance(self, request: HttpRequest, queryset: QuerySet[Node]) -> HttpResponse:
        return self._announce_page(request, list(queryset), self._announce_form())

    @admin.action(description="Remove update lock")
    def remove_update_lock(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        require(request, "nodes.remove_update_lock")
        removed = sum(services.remove_lock(node, request.user) for node in queryset)
        self.message_user(request, f"Removed the update lock of {removed} node(s).", messages.SUCCESS)

    @admin.action(description="End maintenance mode")
    def end_maintenance(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        require(request, "nodes.end_maintenance")
        ended = sum(services.end_maintenance(node) for node in queryset)
        self.message_user(request, f"Ended maintenance mode on {ended} node(s).", messages.SUCCESS)

    # --- pages ---

    def _selected(self, request: HttpRequest) -> QuerySet[Node]:
        raw = request.POST.get("ids") or request.GET.get("ids", "")
        try:
            ids = [int(x) for x in raw.split(",") if x]
        except ValueError:
            ids = []
        return self.get_queryset(request).filter(pk__in=ids).select_related("cluster")

    def autoupdate_view(self, request: HttpRequest) -> HttpResponse:
        require(request, "nodes.start_update")
        nodes = list(self._selected(request))
        if not nodes:
            self.message_user(request, "Select at least one node.", messages.WARNING)
            return HttpResponseRedirect(reverse("admin:nodes_node_changelist"))
        if request.method == "POST" and request.POST.get("confirm") == "yes":
            if request.POST.get("when") == "at":
                return self._announce_update(request, nodes)
            runs, refused = services.start_planned(services.plan_updates(nodes), request.user)
            for msg in refused:
                self.message_user(request, msg, messages.ERROR)
            if runs:
                self.message_user(request, f"Auto-Update started on {len(runs)} node(s).", messages.SUCCESS)
            if len(runs) == 1:
                return HttpResponseRedirect(reverse("admin:updates_updaterun_change", args=[runs[0].pk]))
            if runs and runs[0].rollout_id:  # several nodes started together: their rollout's page
                return HttpResponseRedirect(reverse("admin:updates_rollout_change", args=[runs[0].rollout_id]))
            return HttpResponseRedirect(reverse("admin:updates_updaterun_changelist"))
        return self._autoupdate_page(request, nodes)

    def _announce_update(self, request: HttpRequest, nodes: list[Node]) -> HttpResponse:
        """Announce now, update at: a bad time shows the page again with the reason, nothing announced."""
        form = UpdateAtForm(request.POST)
        if not form.is_valid():
            return self._autoupdate_page(request, nodes, form)
        update_at, message = form.cleaned_data["update_at"], form.cleaned_data["message"]
        notices, refused = services.announce_planned(services.plan_updates(nodes), update_at, request.user, message)
        for msg in refused:
            self.message_user(request, msg, messages.ERROR)
        if notices:
            when = f"{timezone.localtime(update_at):%Y-%m-%d %H:%M %Z}"
            self.message_user(
                request, f"Update announced on {len(notices)} node(s); it starts at {when}.", messages.SUCCESS
            )
        return HttpResponseRedirect(
            reverse("admin:updates_maintenancenotice_changelist") + f"?state__exact={MaintenanceNotice.State.PENDING}"
        )

    def _autoupdate_page(
        self, request: HttpRequest, nodes: list[Node], form: UpdateAtForm | None = None
    ) -> HttpResponse:
        require(request, "nodes.start_update")
        plans = services.plan_updates(nodes)
        lead = timedelta(seconds=services.notice_lead())
        at = timezone.localtime().replace(second=0, microsecond=0) + lead
        context = {
            **self.admin_site.each_context(request),
            "title": "Auto-Update: confirm",
            "plans": plans,
            "ids": ",".join(str(n.pk) for n in nodes),
            "opts": self.model._meta,
            "startable": any(p.release and not p.refusal for p in plans),
            "update_at_form": form or UpdateAtForm(initial={"update_at": at}),
        }
        return TemplateResponse(request, "admin/nodes/node/autoupdate_confirm.html", context)

    def announce_view(self, request: HttpRequest) -> HttpResponse:
        require(request, "nodes.start_update")
        nodes = list(self._selected(request))
        form = self._announce_form(request.POST or None)
        if request.method == "POST" and form.is_valid() and nodes:
            sent = services.announce(nodes, form.cleaned_data["message"], form.cleaned_data["starts_at"], request.user)
            self.message_user(request, f"Announced maintenance on {sent} node(s).", messages.SUCCESS)
            return HttpResponseRedirect(reverse("admin:nodes_node_changelist"))
        return self._announce_page(request, nodes, form)

    @staticmethod
    def _announce_form(data: Any = None) -> AnnounceForm:
        initial = {
            "starts_at": timezone.localtime() + timedelta(seconds=services.notice_lead()),
            "message": "Maintenance: this server will be updated. Please save your work in time.",
        }
        return AnnounceForm(data, initial=initial)

    def _announce_page(self, request: HttpRequest, nodes: list[Node], form: AnnounceForm) -> HttpResponse:
        require(request, "nodes.start_update")
        context = {
            **self.admin_site.each_context(request),
            "title": "Announce maintenance",
            "form": form,
            "nodes": nodes,
            "ids": ",".join(str(n.pk) for n in nodes),
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/nodes/node/announce.html", context)

    def catchup_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        require(request, "nodes.start_update")
        node = get_object_or_404(Node, pk=pk)
        release = services.oldstable_release()
        form = CatchupForm(request.POST or None, release=release)
        if request.method == "POST" and form.is_valid() and release is not None:
            packages = form.cleaned_data["packages"] if form.cleaned_data["mode"] == "partial" else []
            try:
                run = services.start_catchup(node, request.user, packages)
            except UpdateRefused as exc:
                form.add_error(None, str(exc))
            else:
                self.message_user(request, f"{run.get_trigger_display()} started on {node}.", messages.SUCCESS)
                return HttpResponseRedirect(reverse("admin:updates_updaterun_change", args=[run.pk]))
        context = {
            **self.admin_site.each_context(request),
            "title": f"Catch up {node} from Oldstable",
            "node": node,
            "release": release,
            "form": form,
            "installed": node.installed_packages,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/nodes/node/catchup.html", context)

    def remove_lock_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        require(request, "nodes.remove_update_lock")
        node = get_object_or_404(Node, pk=pk)
        if request.method != "POST":
            return HttpResponseRedirect(reverse("admin:nodes_node_change", args=[pk]))
        if services.remove_lock(node, request.user):
            self.message_user(request, f"Removed the update lock of {node}.", messages.SUCCESS)
        else:
            self.message_user(request, f"{node} has no update lock.", messages.WARNING)
        return HttpResponseRedirect(reverse("admin:nodes_node_change", args=[pk]))

    def end_maintenance_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        require(request, "nodes.end_maintenance")
        node = get_object_or_404(Node, pk=pk)
        if request.method == "POST" and services.end_maintenance(node):
            self.message_user(request, f"Ended maintenance mode on {node}.", messages.SUCCESS)
        return HttpResponseRedirect(reverse("admin:nodes_node_change", args=[pk]))

    def accept_key_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """Accept the key the node's agent offers (after comparing its fingerprint with
        what `python -m agent enroll` prints on the node); it replaces an accepted one."""
        require(request, "nodes.manage_node_keys")
        node = get_object_or_404(Node, pk=pk)
        chosen = request.POST.get("key", "")
        key = NodeKey.objects.pending().filter(node=node, pk=chosen).first() if chosen.isdigit() else None
        if request.method == "POST" and key is not None:
            try:
                keys.accept(key, request.user)
                self.message_user(request, f"Accepted the key {key.fingerprint} of {node}.", messages.SUCCESS)
            except keys.KeyRefused as exc:
                self.message_user(request, str(exc), messages.ERROR)
        elif request.method == "POST":
            self.message_user(request, f"{node} offers no such key.", messages.ERROR)
        return HttpResponseRedirect(reverse("admin:nodes_node_change", args=[pk]))

    def revoke_key_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """Distrust the node: nothing it says counts, and no update starts, until a new key is accepted."""
        require(request, "nodes.manage_node_keys")
        node = get_object_or_404(Node, pk=pk)
        if request.method == "POST":
            if keys.revoke(node, request.user, request.POST.get("note", "")):
                self.message_user(request, f"Revoked the key of {node}.", messages.SUCCESS)
            else:
                self.message_user(request, f"{node} has no accepted key.", messages.WARNING)
        return HttpResponseRedirect(reverse("admin:nodes_node_change", args=[pk]))


@admin.register(NodeKey)
class NodeKeyAdmin(admin.ModelAdmin):
    """Every key nodes offered, and what became of it: the fleet's enrollment at a glance
    (filter "Waiting for an operator"). Decisions are made on the node's page."""

    list_display = ["node", "fingerprint", "state", "offered_at", "decided_at", "decided_by", "note"]
    list_filter = ["state"]
    list_select_related = ["node", "decided_by"]
    search_fields = ["node__hostname", "fingerprint"]
    readonly_fields = ["node", "fingerprint", "state", "offered_at", "decided_at", "decided_by", "note"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the history stays


__all__ = ["ClusterAdmin", "NodeAdmin", "NodeKeyAdmin", "Release"]
