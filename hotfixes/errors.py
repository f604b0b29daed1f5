"""Delivery errors and the scrubbing of credentials out of anything we store or log."""

from __future__ import annotations

import base64
from urllib.parse import urlsplit

from django.conf import settings


class DeliveryError(Exception):
    """A notification could not be delivered; the message is safe to show operators."""


class TemporaryDeliveryError(DeliveryError):
    """Worth trying again later: the provider is down, busy or unreachable."""


class PermanentDeliveryError(DeliveryError):
    """Trying again will not help: wrong address, refused, or misconfigured."""


def secrets_in_use() -> list[str]:
    """Every configured credential, in each form it could appear in (raw, Basic auth, URL query)."""
    values = [
        getattr(settings, "EMAIL_HOST_PASSWORD", ""),
        getattr(settings, "HOTFIX_TWILIO_ACCOUNT_SID", ""),
        getattr(settings, "HOTFIX_TWILIO_AUTH_TOKEN", ""),
        getattr(settings, "HOTFIX_WEBHOOK_TOKEN", ""),
        urlsplit(getattr(settings, "HOTFIX_WEBHOOK_URL", "") or "").query,
    ]
    sid, token = getattr(settings, "HOTFIX_TWILIO_ACCOUNT_SID", ""), getattr(settings, "HOTFIX_TWILIO_AUTH_TOKEN", "")
    if sid and token:
        values.append(base64.b64encode(f"{sid}:{token}".encode()).decode())
    # Longest first, so that a secret containing another is replaced whole.
    return sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)


def scrub(text: str) -> str:
    for secret in secrets_in_use():
        text = text.replace(secret, "***")
    return text
