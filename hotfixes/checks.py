"""System checks: a misconfigured phone gateway shows up at start, not at the first urgent notice."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Tags, Warning, register

REQUIRED = {
    "twilio": ["HOTFIX_TWILIO_ACCOUNT_SID", "HOTFIX_TWILIO_AUTH_TOKEN", "HOTFIX_TWILIO_FROM"],
    "webhook": ["HOTFIX_WEBHOOK_URL"],
    "none": [],
}


@register(Tags.compatibility)
def check_phone_gateway(app_configs: Any, **kwargs: Any) -> list[Warning]:
    name = str(getattr(settings, "HOTFIX_PHONE_GATEWAY", "none") or "none").strip().lower()
    if name not in REQUIRED:
        return [Warning(f"HOTFIX_PHONE_GATEWAY={name!r} is unknown: use twilio, webhook or none.", id="hotfixes.W001")]
    missing = [key for key in REQUIRED[name] if not getattr(settings, key, "")]
    if missing:
        return [
            Warning(
                f"The {name} phone gateway is selected but {', '.join(missing)} is not set: "
                "urgent SMS and calls will fail.",
                id="hotfixes.W002",
            )
        ]
    return []
