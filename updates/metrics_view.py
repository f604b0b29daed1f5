"""/metrics: the fleet's Prometheus metrics (updates/metrics.py), never open.

In with the bearer token (TGP_METRICS_TOKEN), or as a user holding
nodes.scrape_metrics, by HTTP basic auth or a session. Without credentials: 401;
wrong ones: 401; a user without the permission: 403.
"""

from __future__ import annotations

import base64
import binascii
import hmac

from django.conf import settings
from django.contrib.auth import authenticate
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.models import PermissionsMixin
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from prometheus_client.exposition import choose_encoder

from updates.metrics import registry

PERMISSION = "nodes.scrape_metrics"
CHALLENGE = 'Bearer realm="tgpadmin metrics", Basic realm="tgpadmin metrics", charset="UTF-8"'


@login_not_required  # it answers 401, never the admin's login page
@require_safe
@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    refused = _refusal(request)
    if refused is not None:
        return refused
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encode(registry()), content_type=content_type)


def _refusal(request: HttpRequest) -> HttpResponse | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return None if token_matches(credentials.strip()) else _unauthorized()
    user = _basic_auth_user(request, credentials.strip()) if scheme.lower() == "basic" else request.user
    if user is None or not user.is_authenticated:
        return _unauthorized()
    # PermissionsMixin: the auth app's user model asks the backends; any other is refused.
    if not (isinstance(user, PermissionsMixin) and user.has_perm(PERMISSION)):
        return HttpResponse(f"Forbidden: needs the permission {PERMISSION}.\n", status=403, content_type="text/plain")
    return None


def token_matches(given: str) -> bool:
    """compare_digest: the time it takes does not tell how much of a guess was right.
    No token configured: nothing matches."""
    expected = settings.TGP_METRICS_TOKEN
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def _basic_auth_user(request: HttpRequest, credentials: str) -> AbstractBaseUser | None:
    """The user of a basic-auth header if its password is right (authenticate: active
    users only), else None."""
    try:
        username, sep, password = base64.b64decode(credentials, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return authenticate(request, username=username, password=password) if sep else None


def _unauthorized() -> HttpResponse:
    response = HttpResponse("Unauthorized: a bearer token or basic auth.\n", status=401, content_type="text/plain")
    response["WWW-Authenticate"] = CHALLENGE
    return response
