"""Bounded fetching of the repository's TUF metadata (agent/shared/repository.py's
fetcher): what a hostile or broken server sends cannot grow memory or time beyond
the limits the caller gives.

- Identity encoding only: ``Accept-Encoding: identity`` is asked for and a response
  with any other ``Content-Encoding`` is refused unread. Nothing is ever inflated, so
  a gzip bomb (1.8 KB on the wire, gigabytes inflated) is 1.8 KB to us.
- No redirects, whatever the client was built with: a 3xx is an error naming its
  location (the repository URL is the only place its files come from).
- Length-bounded: a ``Content-Length`` above the cap is refused before the body is
  read, and reading stops as soon as more than the cap has come (raw network reads,
  one read of httpcore at most beyond the cap), so endless data costs ``max_bytes``.
- A total deadline (slow retrieval): checked after every network read, and no
  connect, read or write timeout of the request is longer than what is left of it.
  A server that trickles a byte now and then fails with its first byte after the
  deadline; one that stalls, when the (capped) read timeout runs out. What is not
  bounded by the deadline: a server trickling its status line and headers (each
  read is, by the capped read timeout; h11 caps the headers at 100 KiB).
- TLS is verified: the client decides, and ``repository.repo_client`` verifies
  against the system CA bundle with no option to turn that off.

Every failure is a FetchError, a DownloadError: retried like any network error by
the callers (the agent's download step, the control plane's next sync). Whether the
bytes are trustworthy is not decided here: the signature check comes after.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from agent.shared.errors import DownloadError


class FetchError(DownloadError):
    """The file could not be fetched within the limits; transient like a network error.
    ``status``: the HTTP status when the server answered with one other than 200."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def fetch_bounded(
    client: httpx.Client,
    url: str,
    max_bytes: int,
    *,
    deadline: float,
    on_headers: Callable[[httpx.Response], None] | None = None,
) -> bytes:
    """GET url: at most max_bytes, all of it within deadline seconds, or FetchError.
    ``on_headers`` sees each response before its body is read (its Date: clock checks)."""
    end = time.monotonic() + deadline
    try:
        with client.stream(
            "GET",
            url,
            headers={"Accept-Encoding": "identity"},
            follow_redirects=False,
            timeout=_capped(client.timeout, deadline),
        ) as resp:
            if on_headers is not None:
                on_headers(resp)
            _check_headers(resp, url, max_bytes)
            body = bytearray()
            # iter_raw: the bytes as they came, never decoded; each one network read.
            for chunk in resp.iter_raw():
                body += chunk
                if len(body) > max_bytes:
                    raise FetchError(f"GET {url}: more than {max_bytes} bytes; refusing it")
                if time.monotonic() > end:
                    raise FetchError(f"GET {url}: not complete within the deadline of {deadline:g} s (slow server)")
            return bytes(body)
    except httpx.TimeoutException as exc:
        if time.monotonic() >= end:
            raise FetchError(f"GET {url}: not complete within the deadline of {deadline:g} s") from exc
        raise FetchError(f"GET {url} timed out: {exc or type(exc).__name__}") from exc
    except httpx.HTTPError as exc:
        raise FetchError(f"GET {url} failed: {exc or type(exc).__name__}") from exc


def _capped(timeout: httpx.Timeout, deadline: float) -> httpx.Timeout:
    def cap(value: float | None) -> float:
        return deadline if value is None else min(value, deadline)

    return httpx.Timeout(
        connect=cap(timeout.connect), read=cap(timeout.read), write=cap(timeout.write), pool=cap(timeout.pool)
    )


def _check_headers(resp: httpx.Response, url: str, max_bytes: int) -> None:
    if resp.is_redirect or 300 <= resp.status_code < 400:
        where = resp.headers.get("Location", "nowhere")
        raise FetchError(f"GET {url} redirects (HTTP {resp.status_code}) to {where}; redirects are not followed")
    if resp.status_code != 200:
        raise FetchError(f"GET {url} answered HTTP {resp.status_code}", resp.status_code)
    encodings = [e.strip().lower() for e in resp.headers.get_list("Content-Encoding", split_commas=True)]
    if any(e not in ("", "identity") for e in encodings):
        raise FetchError(
            f"GET {url}: Content-Encoding {', '.join(encodings)} refused (asked for identity; nothing is inflated)"
        )
    length = resp.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise FetchError(f"GET {url}: Content-Length {int(length)} is more than {max_bytes} bytes; refusing it")
