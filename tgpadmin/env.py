"""Typed readers for environment variables that fail loudly on bad values.

settings.py is the only caller. The readers are the ones the agent uses too
(agent/shared/env.py); here a bad value raises ImproperlyConfigured naming the
variable, so a typo in a deployment stops the process at start, not later.
env_secret is the control plane's own (the agents hold no such secret).
"""

from __future__ import annotations

import re
import stat
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import ParamSpec, TypeVar

from django.core.exceptions import ImproperlyConfigured

from agent.shared import env as shared

P = ParamSpec("P")
T = TypeVar("T")


def _django(reader: Callable[P, T]) -> Callable[P, T]:
    @wraps(reader)
    def read(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return reader(*args, **kwargs)
        except shared.ConfigError as exc:
            raise ImproperlyConfigured(str(exc)) from None

    return read


env_str = _django(shared.env_str)
env_bool = _django(shared.env_bool)
env_int = _django(shared.env_int)
env_float = _django(shared.env_float)
env_list = _django(shared.env_list)
env_zone = _django(shared.env_zone)
env_redis_url = _django(shared.env_redis_url)
env_redis_sentinel = _django(shared.env_redis_sentinel)


# RFC 6750's b64token: what may follow "Bearer " in an Authorization header.
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def env_secret(name: str, *, min_length: int) -> str:
    """A secret from `name`, or from the file `name`_FILE names (its first line), so that
    it need not be in the environment or the process list; "" if neither is set.

    Fails loudly on both set, an unreadable or empty file or one open to other users, a secret
    shorter than `min_length` or not a bearer token. The messages name the variable,
    never the value."""
    value, file_name = env_str(name, ""), env_str(f"{name}_FILE", "")
    if value and file_name:
        raise ImproperlyConfigured(f"{name} and {name}_FILE are both set: set one of them.")
    if file_name:
        name = f"{name}_FILE={file_name!r}"
        value = _read_secret_file(name, Path(file_name))
        if not value:
            raise ImproperlyConfigured(f"{name} is empty.")
    if not value:
        return ""
    if len(value) < min_length or not _TOKEN_RE.fullmatch(value):
        raise ImproperlyConfigured(
            f"The secret in {name} must be at least {min_length} characters of A-Z a-z 0-9 - . _ ~ + / "
            '(e.g. python -c "import secrets; print(secrets.token_urlsafe(32))").'
        )
    return value


def _read_secret_file(name: str, path: Path) -> str:
    try:
        mode, text = path.stat().st_mode, path.read_text()
    except OSError as exc:
        raise ImproperlyConfigured(f"{name} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ImproperlyConfigured(f"{name} is not text.") from None
    if mode & 0o007:
        raise ImproperlyConfigured(
            f"{name} is open to other users (mode {stat.S_IMODE(mode):04o}); it holds a secret: chmod 600 {path}"
        )
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""
