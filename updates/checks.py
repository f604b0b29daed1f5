"""System checks for configuration problems that do not stop the process."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Tags, Warning, register


@register(Tags.security, deploy=False)
def check_configuration(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    problems = []
    if not settings.TGP_REPO_PUBKEY and not settings.TGP_REPO_PUBKEY_FILE.exists():
        problems.append(
            Warning(
                "No repository public key is pinned: node agents will refuse every download.",
                hint="Set TGP_REPO_PUBKEY to the base64 key printed by `manage.py build_repo`, "
                "or TGP_REPO_PUBKEY_FILE to the file holding it.",
                id="tgpadmin.W001",
            )
        )
    if not settings.DEBUG and not settings.ALLOWED_HOSTS:
        problems.append(
            Warning(
                "DJANGO_ALLOWED_HOSTS is empty: every request will be refused.",
                hint="Set DJANGO_ALLOWED_HOSTS to the host names the admin is served under.",
                id="tgpadmin.W002",
            )
        )
    return problems
