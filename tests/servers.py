"""Loopback servers the tests talk to over real sockets."""

from __future__ import annotations

import http.server
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    def __init__(self, directory: Path, **behaviour: Any) -> None:
        self.directory = directory
        self.behaviour = RepoBehaviour(**behaviour)
        handler = lambda *a, **kw: _RepoHandler(*a, directory=str(directory), **kw)  # noqa: E731
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.behaviour = self.behaviour  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> RepoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
