"""System checks for configuration problems that do not stop the process."""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from agent.shared.protocol import LONGEST_LOGOFF_WAIT


@register(Tags.security, deploy=False)
def check_configuration(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    problems: list[CheckMessage] = []
    if not settings.TGP_REPO_ROOT_FILE.exists():
        problems.append(
            Warning(
                f"No repository root is pinned ({settings.TGP_REPO_ROOT_FILE} does not exist): "
                "sync_releases refuses the repository, and so do agents pinned to the same file.",
                hint="Copy the root metadata that `manage.py build_repo` writes (metadata/1.root.json, "
                "or `manage.py repo_keys export-root`) there, or set TGP_REPO_ROOT_FILE to it.",
                id="tgpadmin.W001",
            )
        )
    problems += _online_keys()
    if settings.TGP_SEEN_RESOLUTION >= settings.TGP_RECONCILE_AFTER:
        problems.append(
            Error(
                f"TGP_SEEN_RESOLUTION ({settings.TGP_SEEN_RESOLUTION:g} s) is not below TGP_RECONCILE_AFTER "
                f"({settings.TGP_RECONCILE_AFTER:g} s): a node that reports every heartbeat could look silent "
                "to the reconciler, which then leaves a run with a lost node step waiting.",
                hint="Leave TGP_SEEN_RESOLUTION unset (half of TGP_RECONCILE_AFTER, at most 30 s) or set it lower.",
                id="tgpadmin.E001",
            )
        )
    if settings.TGP_DRAIN_AHEAD > LONGEST_LOGOFF_WAIT:
        problems.append(
            Error(
                f"TGP_DRAIN_AHEAD ({settings.TGP_DRAIN_AHEAD:g} s) is above the {LONGEST_LOGOFF_WAIT:g} s an agent "
                "waits for its users' time: a node would log its users off before the time they were told.",
                hint=f"Set TGP_DRAIN_AHEAD to at most {LONGEST_LOGOFF_WAIT:g} (default 60).",
                id="tgpadmin.E002",
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


def _online_keys() -> list[Warning]:
    """A repository kept on this host whose online keys are not here (as many as their
    threshold, as the beat's signing asks): the beat cannot sign it again, and every node
    refuses the repository once the timestamp expires (a day)."""
    from agent.shared.repository import RepositoryError
    from updates.repository import ONLINE, Store, signers

    store = Store(settings.TGP_REPO_DIR, settings.TGP_REPO_KEYS_DIR)
    if not (store.meta_dir / "timestamp.json").exists():
        return []
    try:
        root = store.root().signed
    except Exception as exc:  # noqa: BLE001 - a broken repository is itself the finding
        return [Warning(f"The repository in {settings.TGP_REPO_DIR} cannot be read: {exc}", id="tgpadmin.W003")]
    missing = []
    for role in ONLINE:
        try:
            signers(root, role, settings.TGP_REPO_KEYS_DIR)
        except RepositoryError:
            missing.append(role)
    if not missing:
        return []
    keys = f"{' and '.join(missing)} key{'s' if len(missing) > 1 else ''}"
    return [
        Warning(
            f"The repository in {settings.TGP_REPO_DIR} is kept here but its {keys} cannot be used from "
            f"{settings.TGP_REPO_KEYS_DIR} (missing, or fewer than its threshold, or unreadable): "
            "the beat cannot sign it again, and nodes refuse it once it expires.",
            hint="Put the online keys (<role>-<keyid>.key) in TGP_REPO_KEYS_DIR, or point TGP_REPO_DIR elsewhere "
            "if the repository is signed on another host.",
            id="tgpadmin.W003",
        )
    ]


@register(Tags.security)
def check_metrics_token(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    """/metrics stays closed without a token (basic auth of a permitted user only), but
    Prometheus is usually set up with a bearer token: say so before a scrape fails."""
    if settings.TGP_METRICS_TOKEN:
        return []
    return [
        Warning(
            "No metrics token is configured: /metrics answers only users with the permission "
            "nodes.scrape_metrics (HTTP basic auth), and refuses Prometheus's bearer token.",
            hint="Set TGP_METRICS_TOKEN, or TGP_METRICS_TOKEN_FILE to a file (mode 600) holding it: "
            'at least 16 characters, e.g. python -c "import secrets; print(secrets.token_urlsafe(32))".',
            id="tgpadmin.W004",
        )
    ]


@register(Tags.compatibility)
def check_broker(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The broker's Sentinel settings (agent/shared/sentinel.py). What cannot work (a
    sentinel:// URL without the primary's name, a malformed URL) stops the process in
    settings; these can, but not as meant."""
    from agent.shared.env import SENTINEL_VARIABLES
    from agent.shared.sentinel import is_sentinel_url, parse_sentinel_url

    if not is_sentinel_url(settings.REDIS_URL):
        stray = [name for name in SENTINEL_VARIABLES if os.environ.get(name)]
        if not stray:
            return []
        return [
            Warning(
                f"{', '.join(stray)} set, but the broker URL (REDIS_URL or TGP_REDIS_URL_FILE) is not a sentinel:// "
                "URL: they are ignored, and this process talks to one Redis server, with no failover.",
                hint="Give this process the sentinel:// URL of its broker user (manage.py broker_acl --url-base "
                "'sentinel://s1:26379;sentinel://s2:26379;sentinel://s3:26379/0'), or unset them. "
                "An agent refuses to start this way.",
                id="tgpadmin.W010",
            )
        ]
    problems: list[CheckMessage] = []
    if len(parse_sentinel_url(settings.REDIS_URL).sentinels) < 2:
        problems.append(
            Warning(
                "The broker URL names a single Sentinel: while it (or its host) is down, no process can find "
                "the primary, which is what Sentinel is there to prevent.",
                hint="Name every Sentinel (three or more, on separate hosts), separated by ';'.",
                id="tgpadmin.W011",
            )
        )
    sentinel = settings.REDIS_SENTINEL
    if sentinel is not None and not sentinel.password:
        problems.append(
            Warning(
                "The Sentinels are asked without a password: whoever reaches one can make it name another "
                "primary (SENTINEL SET, REMOVE, MONITOR) or fail it over.",
                hint="Give the Sentinels a user that may only ask (README, Deployment) and set "
                "TGP_REDIS_SENTINEL_USER and TGP_REDIS_SENTINEL_PASSWORD_FILE.",
                id="tgpadmin.W012",
            )
        )
    return problems
