"""Streaming, resumable package downloader used by the node agent.

One call is one HTTP attempt; the retry policy belongs to the caller. Transient
failures raise DownloadError and keep `<dest>.part` so the next call resumes
with a Range request; bad bytes raise PackageVerificationError and delete it.

Like apt's archive cache, downloads are not fsynced: what guarantees a package
is its sha256, checked again right before it is installed (agent.steps.install
fetches it again if a power cut ate it). Forcing 500 MB to disk would make the
download as slow as the disk, for nothing the hash does not already catch. A
`.part` kept from before a power cut may end in garbage: if a resumed download
does not match, it is discarded and fetched again (DownloadError, retried).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpcore
import httpx

from agent.shared.repository import DownloadError, PackageVerificationError

ProgressCallback = Callable[[int, int], None]


class TooSlow(DownloadError):
    """Slow retrieval: less than the minimum rate came in a whole window. Retried; the
    next attempt resumes from what came."""


@dataclass(frozen=True)
class MinRate:
    """At least `bytes_per_s` on average over every `window` seconds of an attempt.
    A server that stalls is caught by the read timeout; this catches one that trickles
    a byte now and then and would hold a node for days (TUF's slow retrieval attack)."""

    bytes_per_s: int = 1024
    window: float = 60.0

    def check(self, url: str, started: float, came: int, now: float) -> tuple[float, int]:
        """The window's new start and count once a window has passed; TooSlow if it fell short."""
        if now - started < self.window:
            return started, came
        if came < self.bytes_per_s * self.window:
            raise TooSlow(
                f"download of {url} too slow: {came} bytes in {now - started:.0f} s "
                f"(at least {self.bytes_per_s} bytes/s expected); will resume"
            )
        return now, 0


# httpcore reads a response 64 KiB at a time (a size chosen for responses of about
# 1 MB: encode/httpcore#135). For a package of hundreds of MB that is 8,000 passes
# through the HTTP layers per 500 MB, and those, not the network, set the pace: 0.46 x
# curl on loopback (bench/download.py), against about curl's speed with 1 MiB reads.
# A read returns what the socket has, up to this much: memory stays a few MiB.
READ_SIZE = 1024 * 1024
if httpcore.HTTP11Connection.READ_NUM_BYTES < READ_SIZE:
    httpcore.HTTP11Connection.READ_NUM_BYTES = READ_SIZE


def download_package(
    client: httpx.Client,
    url: str,
    dest: Path,
    *,
    size: int,
    sha256: str,
    chunk_size: int = 1024 * 1024,
    progress: ProgressCallback | None = None,
    min_rate: MinRate | None = None,
) -> Path:
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    sha256 = sha256.lower()

    if dest.is_file() and _file_matches(dest, size, sha256, chunk_size):
        _report(progress, size, size)
        return dest

    offset = part.stat().st_size if part.is_file() else 0
    if offset >= size and part.is_file():
        digest = _hash_prefix(part, chunk_size)
        return _finish(part, dest, digest, offset, size, sha256, resumed=True)
    return _fetch(client, url, part, dest, offset, size, sha256, chunk_size, progress, min_rate or MinRate())


def _fetch(
    client: httpx.Client,
    url: str,
    part: Path,
    dest: Path,
    offset: int,
    size: int,
    sha256: str,
    chunk_size: int,
    progress: ProgressCallback | None,
    min_rate: MinRate,
) -> Path:
    # identity: a Content-Encoding would make the bytes differ from the listed hash,
    # and decoding could inflate a small response into unbounded memory.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with client.stream("GET", url, headers=headers) as resp:
            offset = _check_response(resp, url, part, offset, size)
            digest = _hash_prefix(part, chunk_size) if offset else hashlib.sha256()
            with part.open("ab" if offset else "wb") as fh:
                done = _stream_body(resp, fh, digest, offset, size, chunk_size, progress, part, url, min_rate)
    except httpx.TransportError as exc:
        raise DownloadError(f"download of {url} interrupted: {exc or type(exc).__name__}") from exc
    except OSError as exc:
        raise DownloadError(f"cannot write {part}: {exc}") from exc
    if done < size:
        raise DownloadError(f"download of {url} ended early at {done} of {size} bytes")
    return _finish(part, dest, digest, done, size, sha256, resumed=offset > 0)


def _check_response(resp: httpx.Response, url: str, part: Path, offset: int, size: int) -> int:
    """Return the offset the body starts at; raise for statuses we cannot use."""
    status = resp.status_code
    if status == 416:
        # Our .part no longer fits the file on the server: start over next time.
        part.unlink(missing_ok=True)
        raise DownloadError(f"GET {url}: range not satisfiable (HTTP 416); discarded partial download")
    if status == 206 and offset:
        content_range = resp.headers.get("Content-Range", "")
        if not content_range.startswith(f"bytes {offset}-"):
            part.unlink(missing_ok=True)
            raise DownloadError(f"GET {url}: unexpected Content-Range {content_range!r} for offset {offset}")
    elif status == 200:
        offset = 0  # server ignored the Range header: restart from zero
    else:
        raise DownloadError(f"GET {url} answered HTTP {status}")
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit() and offset + int(length) > size:
        part.unlink(missing_ok=True)
        raise PackageVerificationError(
            f"{url} is larger than listed ({offset + int(length)} > {size} bytes); refusing it"
        )
    return offset


def _stream_body(
    resp: httpx.Response,
    fh: BinaryIO,
    digest: hashlib._Hash,
    done: int,
    size: int,
    chunk_size: int,
    progress: ProgressCallback | None,
    part: Path,
    url: str,
    min_rate: MinRate,
) -> int:
    # No re-chunking: httpx's chunker drops its buffered tail when the connection is
    # cut, and every received byte kept in .part is one less to fetch on resume.
    # Network reads are bounded (READ_SIZE); they are written and hashed in batches of
    # chunk_size, so memory stays flat whatever the file size.
    start, pending = done, 0
    batch: list[bytes] = []
    window_start, window_bytes = time.monotonic(), 0
    with _Sink(fh, digest) as sink:
        try:
            for chunk in resp.iter_raw():
                if done + len(chunk) > size:
                    batch.clear()
                    sink.discard()
                    part.unlink(missing_ok=True)
                    raise PackageVerificationError(f"{url} is larger than listed ({size} bytes); refusing it")
                batch.append(chunk)
                pending += len(chunk)
                done += len(chunk)
                if pending >= chunk_size:
                    sink.put(batch)
                    pending = 0
                # What is in .part, not what came: the figure a resume would start from.
                _report(progress, start + sink.written, size)
                window_bytes += len(chunk)  # checked after the chunk is kept: a resume starts after it
                window_start, window_bytes = min_rate.check(url, window_start, window_bytes, time.monotonic())
        finally:
            sink.put(batch)  # a cut connection keeps every byte that came
    _report(progress, done, size)
    return done


class _Sink:
    """Writes and hashes in a thread of its own while the caller parses HTTP.

    File writes and sha256 both release the GIL, so on two cores they run beside
    the network reads instead of after them (bench/download.py: up to about curl's
    throughput, against 0.56 x curl with all three in one thread). Leaving the
    block waits until everything handed over is written and hashed, and raises
    the first write error. A worker killed outright loses what is not written
    yet: at most a batch being filled, DEPTH queued and one being written (4 MiB
    with the default chunk). A cut connection loses nothing.
    """

    DEPTH = 2

    def __init__(self, fh: BinaryIO, digest: hashlib._Hash) -> None:
        self.fh, self.digest = fh, digest
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=self.DEPTH)
        self.error: OSError | None = None
        self.discarding = False
        self.written = 0  # bytes written by this sink; only the sink's thread adds to it
        self.thread = threading.Thread(target=self._run, name="download-sink", daemon=True)

    def __enter__(self) -> _Sink:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None and not self.discarding:
            raise self.error

    def put(self, batch: list[bytes]) -> None:
        """Hand over the batch (and empty it): one write and one hash call per batch."""
        if self.error is not None:
            raise self.error
        if batch:
            data = b"".join(batch)
            batch.clear()
            self.queue.put(data)

    def discard(self) -> None:
        """What is still queued is thrown away: the file is being deleted."""
        self.discarding = True

    def _run(self) -> None:
        while (data := self.queue.get()) is not None:
            if self.error is not None or self.discarding:
                continue  # keep taking batches, so that the reader never blocks
            try:
                self.fh.write(data)
                self.digest.update(data)
                self.written += len(data)
            except OSError as exc:
                self.error = exc


def _finish(part: Path, dest: Path, digest: hashlib._Hash, done: int, size: int, sha256: str, *, resumed: bool) -> Path:
    if done != size or digest.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        what = "size" if done != size else "sha256"
        if resumed:
            # The bytes kept from an earlier attempt may be what went wrong (a power cut):
            # start over once; fresh bytes that do not match are refused for good.
            raise DownloadError(f"{dest.name}: {what} does not match after resuming; discarded, fetching it again")
        raise PackageVerificationError(f"{dest.name}: {what} does not match its signed target info; discarded")
    os.replace(part, dest)
    return dest


def _report(progress: ProgressCallback | None, done: int, size: int) -> None:
    if progress is not None:
        progress(done, size)


def _file_matches(path: Path, size: int, sha256: str, chunk_size: int) -> bool:
    return path.stat().st_size == size and _hash_prefix(path, chunk_size).hexdigest() == sha256


def _hash_prefix(path: Path, chunk_size: int) -> hashlib._Hash:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest
