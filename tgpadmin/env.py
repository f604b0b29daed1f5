"""Typed readers for environment variables that fail loudly on bad values.

settings.py is the only caller. The readers are the ones the agent uses too
(agent/shared/env.py); here a bad value raises ImproperlyConfigured naming the
variable, so a typo in a deployment stops the process at start, not later.
"""

from __future__ import annotations

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
