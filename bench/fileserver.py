"""A loopback file server for the download benchmark.

tests/servers.py: RepoServer reads a whole file into memory and writes it in
16 KiB pieces from Python; at 500 MB that would measure the server, not the
downloader. This one uses sendfile(2), honours `Range: bytes=N-`, counts the
bytes each response really sent, and can cut the first connection mid-body.
"""

from __future__ import annotations

import http.server
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Served:
    path: str
    range: str | None
    start: int
    sent: int = 0


@dataclass
class Behaviour:
    cut_after: int | None = None  # the first body stops after this many bytes, then the connection drops
    log: list[Served] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        root: Path = self.server.root  # type: ignore[attr-defined]
        behaviour: Behaviour = self.server.behaviour  # type: ignore[attr-defined]
        path = root / self.path.lstrip("/").split("?")[0]
        if not path.is_file() or root not in path.resolve().parents:
            self.send_error(404)
            return
        size = path.stat().st_size
        start = self._start(size)
        served = Served(self.path, self.headers.get("Range"), start)
        with behaviour.lock:
            behaviour.log.append(served)
            cut, behaviour.cut_after = behaviour.cut_after, None
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        self.wfile.flush()
        count = size - start if cut is None else max(0, cut - start)
        with path.open("rb") as fh:
            try:
                served.sent = self.connection.sendfile(fh, offset=start, count=count)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
        if cut is not None:
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def _start(self, size: int) -> int:
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and int(match.group(1)) < size:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            return start
        self.send_response(200)
        return 0


class FileServer:
    def __init__(self, root: Path) -> None:
        self.behaviour = Behaviour()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.root = Path(root).resolve()  # type: ignore[attr-defined]
        self.httpd.behaviour = self.behaviour  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
