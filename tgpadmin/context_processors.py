from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from django.utils.functional import SimpleLazyObject


def download_errors(request: HttpRequest) -> dict[str, Any]:
    """Nodes with the download warning flag, for the admin's title bar. Lazy: one
    query, only on pages that show it."""
    from nodes.models import Node

    def flagged() -> list[str]:
        return list(Node.objects.filter(download_warning=True).values_list("hostname", flat=True))

    return {"download_error_nodes": SimpleLazyObject(flagged)}
