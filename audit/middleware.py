"""django-auditlog's middleware, with the client's address taken only from what we trust."""

from __future__ import annotations

import ipaddress
from typing import Any

from auditlog.middleware import AuditlogMiddleware
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils.functional import SimpleLazyObject

from audit.context import acting


def client_address(request: HttpRequest) -> str | None:
    """The address of the connection, or with TGP_PROXY_COUNT proxies in front the one the
    outermost of them saw: each proxy appends its peer to X-Forwarded-For, and anything
    left of that is the client's own to invent (auditlog takes the leftmost). A header
    shorter than the proxies (a request that did not pass them all): the connection's."""
    address = request.META.get("REMOTE_ADDR", "")
    hops = settings.TGP_PROXY_COUNT
    forwarded = [part.strip() for part in request.headers.get("X-Forwarded-For", "").split(",") if part.strip()]
    if hops and len(forwarded) >= hops:
        address = forwarded[-hops]
    try:
        return str(ipaddress.ip_address(address))  # a GenericIPAddressField: PostgreSQL refuses anything else
    except ValueError:
        return None


class AuditMiddleware(AuditlogMiddleware):
    """auditlog's actor and address for every request, kept for audit.records too."""

    @staticmethod
    def _get_remote_addr(request: HttpRequest) -> str | None:
        return client_address(request)

    @staticmethod
    def _get_remote_port(request: HttpRequest) -> int | None:
        return None  # X-Forwarded-Port is the client's to say

    @staticmethod
    def _get_actor(request: HttpRequest) -> Any:
        # Lazy: a request that records nothing (a /metrics scrape) loads no user for it.
        return SimpleLazyObject(lambda: AuditlogMiddleware._get_actor(request))

    def __call__(self, request: HttpRequest) -> HttpResponse:
        data = self.get_extra_data(request)
        # Ours for the rows audit.records writes (in bulk: no pre_save), auditlog's for any other.
        with acting(actor=data["actor"], remote_addr=data["remote_addr"]):
            return super().__call__(request)
