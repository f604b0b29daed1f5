"""Typed readers for environment variables that fail loudly on bad values.

settings.py is the only caller. The readers are the ones the agent uses too
(agent/shared/env.py); here a bad value raises ImproperlyConfigured naming the
variable, so a typo in a deployment stops the process at start, not later.
env_secret is the control plane's own (the agents hold no such secret).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import wraps
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
    """A bearer token from `name` or the file `name`_FILE names (agent/shared/env.py's
    env_secret: one of them, the file its owner's only); "" if neither is set. Fails
    loudly on one shorter than `min_length` or not a bearer token. The messages name
    the variable, never the value."""
    value = _django(shared.env_secret)(name)
    if value and (len(value) < min_length or not _TOKEN_RE.fullmatch(value)):
        raise ImproperlyConfigured(
            f"The secret in {name} (or {name}_FILE) must be at least {min_length} characters of "
            'A-Z a-z 0-9 - . _ ~ + / (e.g. python -c "import secrets; print(secrets.token_urlsafe(32))").'
        )
    return value
