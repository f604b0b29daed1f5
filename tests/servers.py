"""Loopback servers the tests talk to over real sockets."""

from __future__ import annotations

import http.server
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lasting_port() -> int:
    """A free port that stays free until it is bound much later (a server that a process
    started at the beginning of the session is pointed at): below the ephemeral range,
    which free_port and every outgoing connection of every process draw from. A port
    from that range was taken by something else meanwhile when two pytest-xdist
    workers ran side by side ("Address already in use")."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(10000, low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between 10000 and {low}")


@dataclass
class RepoBehaviour:
    rate: int | None = None  # bytes per second for package files, None: as fast as possible
    requests: list[dict[str, Any]] = field(default_factory=list)


class _RepoHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a repository directory with Range support and an optional rate limit."""

    protocol_version = "HTTP/1.1"
    # As nginx's tcp_nodelay: with Nagle on, the tail of each response waits for
    # the client's delayed ACK (40 ms on Linux), which dwarfs a small download.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        behaviour: RepoBehaviour = self.server.behaviour  # type: ignore[attr-defined]
        behaviour.requests.append({"path": self.path, "range": self.headers.get("Range")})
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and int(match.group(1)) < len(data):
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        try:
            self._send(data[start:], behaviour.rate if path.suffix == ".gz" else None)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send(self, body: bytes, rate: int | None) -> None:
        piece = 16 * 1024
        for i in range(0, len(body), piece):
            self.wfile.write(body[i : i + piece])
            if rate:
                time.sleep(piece / rate)


class RepoServer:
    def __init__(self, directory: Path, *, address: str = "127.0.0.1", **behaviour: Any) -> None:
        self.directory = directory
        self.behaviour = RepoBehaviour(**behaviour)
        handler = lambda *a, **kw: _RepoHandler(*a, directory=str(directory), **kw)  # noqa: E731
        self.httpd = http.server.ThreadingHTTPServer((address, 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.behaviour = self.behaviour  # type: ignore[attr-defined]
        self.url = f"http://{address}:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RepoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# --- hostile answers, for the tests of bounded fetching and of TUF's threat list ---------


class Heads:
    """head(): a status line and headers (``Content_Length`` is sent as Content-Length)."""

    def head(self: Any, status: int = 200, **headers: str | int) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), str(value))
        self.end_headers()
        self.wfile.flush()


def body(data: bytes, **headers: str | int) -> Callable[[Any], None]:
    """A route answering 200 with data and the headers given."""

    def route(h: Any) -> None:
        h.head(200, Content_Length=len(data), **headers)
        h.wfile.write(data)

    return route


def endless(h: Any) -> None:
    """A route with no Content-Length and no end (256 MiB at most, so that a broken client
    cannot hang the run); counts into the server's ``sent`` and sets its ``hung_up``."""
    server: Any = h.server
    h.head(200, Connection="close")
    h.close_connection = True
    block = b"x" * (64 * 1024)
    try:
        for _ in range(4096):
            h.wfile.write(block)
            server.sent += len(block)
    except OSError:
        server.hung_up.set()
        raise


def gzip_bomb(inflated_mib: int) -> bytes:
    """A valid gzip stream of inflated_mib MiB of zeros, about 1/1000 of that on the wire.
    Built from one compressed MiB repeated (a full flush resets the compressor's state)."""
    import struct
    import zlib

    mib = 1024 * 1024
    block = b"\0" * mib
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(block) + comp.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(inflated_mib):
        crc = zlib.crc32(block, crc)
    final_empty_block = b"\x03\x00"
    return (
        first + again * (inflated_mib - 1) + final_empty_block + struct.pack("<II", crc, (inflated_mib * mib) % 2**32)
    )


def measured(fn: Callable[[], object]) -> tuple[object, int]:
    """What fn returned or raised, and the peak of Python memory while it ran (all threads)."""
    import tracemalloc

    tracemalloc.start()
    try:
        try:
            result: object = fn()
        except Exception as exc:  # noqa: BLE001 - the caller asserts what it is
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
