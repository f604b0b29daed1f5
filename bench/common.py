"""What several benchmarks share: a private Redis, Django on a private SQLite
database, real worker processes, and the shape of a result."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tgpadmin.processes import die_with_parent, stop_process

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-only-secret-key-" + "x" * 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[Any]:
    with open(log, "a") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip


def in_workspace(name: str, measure: Callable[[Path, str], dict[str, Any]]) -> dict[str, Any]:
    """Run measure(work, redis_url) in a temporary directory with its own Redis and
    SQLite database, removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=f"tgp-bench-{name}-"))
    try:
        with redis_server(work) as redis_url:
            setup_django(work / "var")
            return measure(work, redis_url)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """REDIS_URL if set, else the embedded redis-server on a free port (as tests/conftest.py
    does). Puts the URL into the environment: Django settings read it at import."""
    url = os.environ.get("REDIS_URL", "")
    proc = None
    if not url:
        sys.path.insert(0, str(ROOT))
        from tgpadmin import embedded_redis  # no Django import: settings are not loaded yet

        port = free_port()
        cmd = embedded_redis.command(port, workdir / "redis", persist=False)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        embedded_redis.wait_until_up(port)
        url = f"redis://127.0.0.1:{port}/0"
    os.environ["REDIS_URL"] = url
    try:
        yield url
    finally:
        if proc:
            stop_process(proc)


def setup_django(var_dir: Path) -> None:
    """Django on a SQLite file of its own under var_dir, migrated. DATABASE_URL is
    dropped on purpose: a benchmark must never write into a real database."""
    # static/ too: whitenoise warns about a STATIC_ROOT that does not exist (the admin
    # benchmark serves pages; collectstatic is not what it measures).
    (var_dir / "static").mkdir(parents=True, exist_ok=True)
    os.environ.pop("DATABASE_URL", None)
    os.environ["DJANGO_SETTINGS_MODULE"] = "tgpadmin.settings"
    os.environ["TGP_VAR_DIR"] = str(var_dir)
    os.environ.setdefault("DJANGO_SECRET_KEY", SECRET)
    os.environ.setdefault("TGP_LOG_LEVEL", "WARNING")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)


def enroll(nodes: list[Any], state_dir: Path) -> None:
    """What an operator does for a real fleet: each node's key (made in its appliance's
    state directory, where its agent signs with it) accepted, and the control plane's
    public key where the agents look for it (TGP_VAR_DIR/keys/control.pub)."""
    from agent.shared import signing
    from nodes import keys
    from nodes.demo import publish_control_key

    publish_control_key()
    for node in nodes:
        key, _ = signing.load_or_create_private(state_dir / node.hostname / "identity.key")
        keys.enroll_accepted(node, signing.public_b64(key), "accepted by the benchmark")


def database_url() -> str:
    from django.db import connection

    return f"sqlite:///{Path(connection.settings_dict['NAME']).resolve()}"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with few samples p99 is the largest, not an interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def metric(figure: str, value: float, unit: str, target: str = "", ok: bool | None = None) -> dict[str, Any]:
    """One line of the results table; ok None means "reported, no target"."""
    return {"figure": figure, "value": round(value, 3), "unit": unit, "target": target, "pass": ok}
