"""System checks for configuration problems that do not stop the process."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register


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
