"""The admin site: Django's, with the fleet overview on its home page."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.template.response import TemplateResponse

from updates import overview


class AdminSite(admin.AdminSite):
    index_template = "admin/fleet_index.html"

    def index(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> TemplateResponse:
        """The overview above the list of models (admin/fleet_index.html), for whoever may
        see the nodes: its counts are nodes, and every one links to the node list."""
        shown = request.user.has_perm("nodes.view_node")
        context = {"overview": overview.compute() if shown else None, **(extra_context or {})}
        return super().index(request, context)
