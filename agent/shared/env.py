"""Typed readers for environment variables that fail loudly on bad values.

Both sides read their configuration through these: the agent (agent/config.py)
and the control plane (tgpadmin/env.py, which turns ConfigError into Django's
ImproperlyConfigured). A typo in a deployment stops the process at start.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from agent.shared import sentinel

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


def env_str(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None:
        raise ConfigError(f"Environment variable {name} is required.")
    return value


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off).")


def env_int(name: str, default: int, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer.") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum of {minimum}.")
    return value


def env_float(name: str, default: float, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number.") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum of {minimum}.")
    return value


def env_zone(name: str, default: str) -> str:
    """A canonical IANA time zone name (agent/shared/zones.py)."""
    from agent.shared.zones import canonical_zone

    value = env_str(name, default)
    try:
        canonical_zone(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return value


def env_list(name: str, default: str = "") -> list[str]:
    raw = os.environ.get(name, default)
    return [item.strip() for item in raw.split(",") if item.strip()]


# --- the broker URL ----------------------------------------------------------------

_TLS_REQUIRED = {"required", "cert_required"}


def env_redis_url(default: str) -> str:
    """The Redis (broker) URL of this process, the same way on both sides.

    REDIS_URL, or the first line of the file TGP_REDIS_URL_FILE names (each process
    reads its own broker user's URL from a file that ``manage.py broker_acl`` writes,
    so the password is in neither the environment nor the process list), else
    `default`. The file must not be readable by other users.

    A ``rediss://`` URL always checks the server's certificate: against the CA in
    TGP_REDIS_CA_FILE when that is set (``ssl_ca_certs``), else the system's CAs.
    kombu would otherwise connect to anyone with ``ssl_cert_reqs=none`` (its default for
    rediss:// without options), so a URL that asks for less than ``required`` is refused.

    A ``sentinel://`` URL names the Sentinels (agent/shared/sentinel.py) and comes back
    with the user, password and database in every entry; env_redis_sentinel() reads the
    rest of its configuration.
    """
    url, source = env_str("REDIS_URL", ""), "REDIS_URL"
    url_file = env_str("TGP_REDIS_URL_FILE", "")
    if url and url_file:
        raise ConfigError("REDIS_URL and TGP_REDIS_URL_FILE are both set: set one of them.")
    if url_file:
        url, source = _read_url_file(url_file), f"the URL in {url_file} (TGP_REDIS_URL_FILE)"
    url = url or default
    if sentinel.is_sentinel_url(url):
        return _sentinel_url(url, source, env_str("TGP_REDIS_CA_FILE", ""))
    return _with_tls(url, source, env_str("TGP_REDIS_CA_FILE", ""))


def _sentinel_url(url: str, source: str, ca_file: str) -> str:
    if ca_file:
        raise ConfigError(
            f"TGP_REDIS_CA_FILE is set, but {source} is a sentinel:// URL: TLS through Sentinel is not supported."
        )
    try:
        return sentinel.parse_sentinel_url(url, source).url()
    except sentinel.SentinelConfigError as exc:
        raise ConfigError(str(exc)) from None


# All of them mean "through Sentinel": none belongs next to a plain redis:// URL.
SENTINEL_VARIABLES = (
    "TGP_REDIS_SENTINEL_MASTER",
    "TGP_REDIS_SENTINEL_USER",
    "TGP_REDIS_SENTINEL_PASSWORD",
    "TGP_REDIS_SENTINEL_PASSWORD_FILE",
)


def env_redis_sentinel(url: str) -> sentinel.Sentinel | None:
    """How this process finds the primary through the Sentinels that `url` (from
    env_redis_url) names: TGP_REDIS_SENTINEL_MASTER, the name they monitor it under, and
    their own credentials, TGP_REDIS_SENTINEL_USER with TGP_REDIS_SENTINEL_PASSWORD or (to
    keep it out of the environment) TGP_REDIS_SENTINEL_PASSWORD_FILE. None without a
    master name. A sentinel:// URL without one is refused; the other way round (a name,
    but a plain URL) is for the caller to judge (the agent refuses it, the control plane
    warns: tgpadmin.W010)."""
    master = env_str("TGP_REDIS_SENTINEL_MASTER", "").strip()
    if not master:
        if sentinel.is_sentinel_url(url):
            raise ConfigError(
                "The broker URL (REDIS_URL or TGP_REDIS_URL_FILE) names Sentinels: set TGP_REDIS_SENTINEL_MASTER "
                "to the name they monitor the primary under (their `sentinel monitor NAME ...`)."
            )
        return None
    password = env_secret("TGP_REDIS_SENTINEL_PASSWORD")
    try:
        return sentinel.Sentinel(master, env_str("TGP_REDIS_SENTINEL_USER", "").strip(), password)
    except sentinel.SentinelConfigError as exc:
        raise ConfigError(f"TGP_REDIS_SENTINEL_MASTER: {exc}") from None


def env_secret(name: str) -> str:
    """A secret from `name`, or from the file `name`_FILE names (its first line, the file
    readable by its owner only), so that it need not be in the environment or the
    process list; "" if neither is set. The messages name the variable, never the value."""
    value, file_name = env_str(name, ""), env_str(f"{name}_FILE", "")
    if value and file_name:
        raise ConfigError(f"{name} and {name}_FILE are both set: set one of them.")
    return _read_secret_file(f"{name}_FILE", file_name) if file_name else value


def _read_secret_file(variable: str, name: str) -> str:
    """The first line of a file that holds a password and that nobody else may read."""
    path = Path(name)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{variable}={name!r} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{variable}={name!r} is not text.") from None
    if mode & 0o007:
        raise ConfigError(
            f"{variable}={name!r} is open to other users (mode {stat.S_IMODE(mode):04o}); "
            f"it holds a password: chmod 600 {name}"
        )
    lines = text.strip().splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError(f"{variable}={name!r} is empty.")
    return lines[0].strip()


def _read_url_file(name: str) -> str:
    url = _read_secret_file("TGP_REDIS_URL_FILE", name)  # the broker user's password is in it
    if not url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
        raise ConfigError(f"TGP_REDIS_URL_FILE={name!r} does not hold a redis://, rediss:// or sentinel:// URL.")
    return url


def _with_tls(url: str, source: str, ca_file: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if parts.scheme != "rediss":
        if ca_file:
            raise ConfigError(f"TGP_REDIS_CA_FILE is set, but {source} is not a rediss:// (TLS) URL.")
        return url
    if ca_file:
        if not Path(ca_file).is_file():
            raise ConfigError(f"TGP_REDIS_CA_FILE={ca_file!r} is not a file.")
        if query.get("ssl_ca_certs", ca_file) != ca_file:
            raise ConfigError(f"TGP_REDIS_CA_FILE and the ssl_ca_certs of {source} name different CAs: set one.")
        query["ssl_ca_certs"] = ca_file
    reqs = query.setdefault("ssl_cert_reqs", "required")
    if reqs.lower() not in _TLS_REQUIRED:
        raise ConfigError(
            f"{source} has ssl_cert_reqs={reqs}: TLS that does not check the server's certificate "
            "protects no password; use ssl_cert_reqs=required (the default) and TGP_REDIS_CA_FILE."
        )
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))
