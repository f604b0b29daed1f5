"""The repository's base errors, apart so that the fetcher (agent/shared/fetch.py)
and the repository format (agent/shared/repository.py) can share them."""

from __future__ import annotations


class RepositoryError(Exception):
    """Base class; the message is meant for operators."""


class DownloadError(RepositoryError):
    """Transient: network error, 5xx, cut connection. The agent's download step retries it."""
