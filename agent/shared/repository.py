"""The update repository as both sides read it: The Update Framework (python-tuf).

The repository publishes TUF metadata with the four top-level roles under
``<url>/metadata/`` and the packages under ``<url>/targets/`` (consistent
snapshots: ``N.targets.json``, ``N.snapshot.json``, and each package file prefixed
with its sha256, so a reader never mixes two versions; only ``timestamp.json``
keeps its name). Building and signing is the control side's (updates/repository.py).

A reader pins a trusted root (at enrollment; ``TGP_REPO_ROOT_FILE``) and keeps
the metadata it verified in a directory of its own: ``tuf.ngclient.Updater``
walks root rotations, checks thresholds, versions (no rollback), expiry, and the
lengths and hashes that tie timestamp, snapshot and targets together. Every file
comes through :class:`BoundedFetcher` (agent/shared/fetch.py): identity encoding,
no redirects, bounded length and time.

Releases are not a file of their own: each package is a target file
``releases/<release>/<name>_<version>.tar.gz`` whose custom field ``tgp`` names
its package and carries its release's metadata (channel, needs reboot, hotfix,
notes). Packages themselves stream through the agent's resumable downloader and
are accepted only if length and sha256 match the signed target info
(:func:`verify_package`, ``TargetFile.verify_length_and_hashes``).
"""

from __future__ import annotations

import fcntl
import hashlib
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from agent.shared.errors import DownloadError as DownloadError
from agent.shared.errors import RepositoryError as RepositoryError
from agent.shared.fetch import FetchError as FetchError
from agent.shared.fetch import fetch_bounded
from agent.shared.protocol import CHANNELS, PACKAGE_NAME_RE, SHA256_RE, VERSION_RE, version_key

METADATA_DIR = "metadata"
TARGETS_DIR = "targets"
RELEASES_DIR = "releases"
RELEASE_META = "release.json"
PACKAGE_SUFFIX = ".tar.gz"
CUSTOM_KEY = "tgp"
# A hostile or broken server must not keep a reader waiting for one metadata file
# (slow retrieval); the length of each is bounded by TUF (UpdaterConfig, and the
# exact lengths the timestamp and snapshot list).
METADATA_DEADLINE = 120.0
# A clock this far from the repository server's (its HTTP Date) is named as the
# likely cause when metadata is found expired.
CLOCK_SKEW = 300.0


class IndexFormatError(RepositoryError):
    """A broken source tree, or signed targets that do not describe releases as we write them."""


class MetadataRefused(RepositoryError):
    """Signed metadata that fails TUF's checks (signatures, thresholds, versions,
    lengths and hashes): an attack or a broken repository. Not retried."""


class MetadataExpired(FetchError):
    """Metadata past its expiry: a repository nobody re-signs (a freeze), or this
    machine's clock. Retried like a network error: both may heal."""


class PackageVerificationError(RepositoryError):
    """Size or sha256 mismatch: permanent, retrying the same bytes will not help."""


class ReleaseWithdrawn(RepositoryError):
    """The signed targets do not list the release (any more): it is not installed."""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class PackageEntry:
    name: str
    version: str
    file: str  # the target path: releases/<release>/<name>_<version>.tar.gz
    size: int
    sha256: str


@dataclass(frozen=True)
class ReleaseEntry:
    version: str
    channel: str
    needs_reboot: bool
    hotfix: bool
    notes: str
    packages: tuple[PackageEntry, ...]

    def meta(self) -> dict[str, Any]:
        """Its part of each package's custom field."""
        return {"channel": self.channel, "needs_reboot": self.needs_reboot, "hotfix": self.hotfix, "notes": self.notes}


@dataclass(frozen=True)
class RepositoryIndex:
    """The releases of one verified targets metadata; ``serial`` is its version."""

    serial: int
    expires: datetime
    releases: tuple[ReleaseEntry, ...]

    def release(self, version: str) -> ReleaseEntry:
        for rel in self.releases:
            if rel.version == version:
                return rel
        raise ReleaseWithdrawn(
            f"release {version} was withdrawn from the repository: its signed targets (version {self.serial}) "
            "do not list it"
        )

    def newest(self, channel: str) -> ReleaseEntry | None:
        candidates = [r for r in self.releases if r.channel == channel]
        return max(candidates, key=lambda r: version_key(r.version), default=None)


# --------------------------------------------------------------------------- names


def validate_package_name(name: Any) -> str:
    if not isinstance(name, str) or not PACKAGE_NAME_RE.match(name):
        raise IndexFormatError(f"invalid package name {name!r} (allowed: {PACKAGE_NAME_RE.pattern})")
    return name


def validate_version(version: Any, what: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise IndexFormatError(f"{what}: invalid version {version!r}")
    return version


def package_filename(name: str, version: str) -> str:
    return f"{name}_{version}{PACKAGE_SUFFIX}"


def target_path(release: str, name: str, version: str) -> str:
    return f"{RELEASES_DIR}/{release}/{package_filename(name, version)}"


def package_url(base_url: str, entry: PackageEntry) -> str:
    """Where the bytes are (consistent snapshots: the file name carries its sha256)."""
    directory, _, filename = entry.file.rpartition("/")
    return f"{base_url.rstrip('/')}/{TARGETS_DIR}/{directory}/{entry.sha256}.{filename}"


def custom_fields(release: ReleaseEntry, package: PackageEntry) -> dict[str, Any]:
    """A package's custom field: its name and version and its release's metadata."""
    return {
        CUSTOM_KEY: {"package": package.name, "version": package.version, "release": release.version} | release.meta()
    }


# --------------------------------------------------------------------------- targets -> releases


def index_from_targets(targets: Targets) -> RepositoryIndex:
    """The releases the verified targets metadata lists."""
    packages: dict[str, list[PackageEntry]] = {}
    metas: dict[str, dict[str, Any]] = {}
    for path, info in sorted(targets.targets.items()):
        release, meta, entry = _parse_target(path, info)
        if metas.setdefault(release, meta) != meta:
            raise IndexFormatError(f"release {release}: its packages disagree on the release's metadata")
        packages.setdefault(release, []).append(entry)
    releases = tuple(
        ReleaseEntry(version=v, packages=tuple(packages[v]), **metas[v]) for v in sorted(packages, key=version_key)
    )
    return RepositoryIndex(serial=targets.version, expires=targets.expires, releases=releases)


def _parse_target(path: str, info: TargetFile) -> tuple[str, dict[str, Any], PackageEntry]:
    custom = info.custom
    data = custom.get(CUSTOM_KEY) if isinstance(custom, dict) else None
    if not isinstance(data, dict):
        raise IndexFormatError(f"target {path}: no {CUSTOM_KEY!r} custom field")
    where = f"target {path}"
    release = validate_version(data.get("release"), where)
    name = validate_package_name(data.get("package"))
    version = validate_version(data.get("version"), where)
    # Only the one canonical form: no path from the metadata can point anywhere else.
    if path != target_path(release, name, version):
        raise IndexFormatError(f"{where}: must be {target_path(release, name, version)!r}")
    sha256 = info.hashes.get("sha256")
    # Checked as strictly as the name: it becomes part of the package's URL (package_url).
    if not isinstance(sha256, str) or not SHA256_RE.match(sha256):
        raise IndexFormatError(f"{where}: no sha256 (64 lowercase hex digits)")
    meta = {
        "channel": _typed(data, "channel", str, where),
        "needs_reboot": _typed(data, "needs_reboot", bool, where),
        "hotfix": _typed(data, "hotfix", bool, where),
        "notes": _typed(data, "notes", str, where),
    }
    if meta["channel"] not in CHANNELS:
        raise IndexFormatError(f"{where}: unknown channel {meta['channel']!r}")
    entry = PackageEntry(name=name, version=version, file=path, size=info.length, sha256=sha256)
    return release, meta, entry


def _typed(data: dict[str, Any], key: str, typ: type, where: str) -> Any:
    value = data.get(key)
    if not isinstance(value, typ):
        raise IndexFormatError(f"{where}: custom field {key!r} must be {typ.__name__}")
    return value


def verify_package(entry: PackageEntry, path: Path) -> None:
    """TUF's own check of a file against its signed target info; PackageVerificationError if it fails."""
    info = TargetFile(length=entry.size, hashes={"sha256": entry.sha256}, path=entry.file)
    try:
        with path.open("rb") as fh:
            info.verify_length_and_hashes(fh)
    except tuf_errors.LengthOrHashMismatchError as exc:
        raise PackageVerificationError(f"{path.name} does not match its signed target info: {exc}") from None


# --------------------------------------------------------------------------- fetching


_tls_lock = threading.Lock()
_tls: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    # Loading the CA bundle takes 20-100 ms of CPU: once per process, not once per
    # download, nor once per thread when several threads start downloading at once.
    global _tls
    with _tls_lock:
        if _tls is None:
            _tls = httpx.create_ssl_context()
        return _tls


def repo_client(timeout: float) -> httpx.Client:
    """An HTTP client for the repository. Redirects are not followed: the metadata
    names the only place a file may come from. TLS is always verified against the
    system CA bundle: there is deliberately no option to turn that off."""
    return httpx.Client(timeout=timeout, follow_redirects=False, verify=_tls_context())


class BoundedFetcher(FetcherInterface):
    """python-tuf's network interface on our bounded fetch: ngclient gives the length
    cap of each file, we add identity encoding, no redirects and a deadline. It notes
    the server's clock (HTTP Date) to tell clock trouble from a frozen repository."""

    def __init__(self, client: httpx.Client, deadline: float = METADATA_DEADLINE) -> None:
        self.client, self.deadline = client, deadline
        self.server_time: datetime | None = None
        self.last_url: str | None = None

    def download_bytes(self, url: str, max_length: int) -> bytes:
        self.last_url = url
        try:
            return fetch_bounded(self.client, url, max_length, deadline=self.deadline, on_headers=self._note_date)
        except FetchError as exc:
            if exc.status is not None:
                # ngclient reads 404 for N.root.json as "no newer root".
                raise tuf_errors.DownloadHTTPError(str(exc), exc.status) from exc
            raise tuf_errors.DownloadError(str(exc)) from exc

    def _fetch(self, url: str) -> Iterator[bytes]:
        # Only download_file would come here; ngclient's metadata path is download_bytes.
        yield self.download_bytes(url, UpdaterConfig().targets_max_length)

    def _note_date(self, resp: httpx.Response) -> None:
        with suppress(KeyError, TypeError, ValueError):
            self.server_time = parsedate_to_datetime(resp.headers["Date"]).astimezone(UTC)


def read_pinned_root(path: Path) -> bytes:
    """The root a reader pins (TGP_REPO_ROOT_FILE, on a node and on the control host)."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise RepositoryError(f"no pinned repository root: TGP_REPO_ROOT_FILE {path}: {exc.strerror}") from None


def root_summary(data: bytes) -> dict[str, Any]:
    """Version and sha256 of a root an operator pins, after checking it is TUF root
    metadata signed by its own root keys; MetadataRefused otherwise."""
    try:
        root_md = Metadata[Root].from_bytes(data)
        root_md.signed.verify_delegate(Root.type, root_md.signed_bytes, root_md.signatures)
    except (tuf_errors.RepositoryError, ValueError, TypeError) as exc:
        raise MetadataRefused(f"not a TUF root signed by its own root keys: {exc}") from None
    return {"version": root_md.signed.version, "sha256": hashlib.sha256(data).hexdigest()}


def metadata_dir_for(base: Path, trusted_root: bytes) -> Path:
    """A metadata directory per pinned root: pinning another repository's root starts
    afresh instead of failing on the metadata of the old one."""
    return Path(base) / hashlib.sha256(trusted_root).hexdigest()[:16]


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """ngclient is meant for one instance per metadata directory at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def trusted_index(
    metadata_dir: Path,
    base_url: str,
    trusted_root: bytes,
    *,
    client: httpx.Client,
    deadline: float = METADATA_DEADLINE,
) -> RepositoryIndex:
    """Refresh the metadata in metadata_dir from the repository (TUF's client workflow)
    and return its releases. FetchError (MetadataExpired among them) if it could not,
    MetadataRefused if what came fails a check, IndexFormatError if it verifies but
    does not describe releases."""
    base = base_url.rstrip("/")
    fetcher = BoundedFetcher(client, deadline)
    with _locked(metadata_dir):
        try:
            updater = Updater(
                str(metadata_dir),
                f"{base}/{METADATA_DIR}/",
                target_base_url=f"{base}/{TARGETS_DIR}/",
                fetcher=fetcher,
                bootstrap=trusted_root,
            )
        except (tuf_errors.RepositoryError, ValueError) as exc:
            raise MetadataRefused(f"the pinned trusted root is not valid TUF root metadata: {exc}") from None
        try:
            updater.refresh()
        except tuf_errors.DownloadError as exc:
            raise FetchError(f"repository metadata not fetched: {exc}") from exc
        except tuf_errors.ExpiredMetadataError as exc:
            raise MetadataExpired(_expired_message(exc, fetcher.server_time)) from exc
        except tuf_errors.RepositoryError as exc:
            raise MetadataRefused(_refused_message(exc, fetcher.last_url)) from exc
        # All targets are top-level (no delegations), so listing them is safe; ngclient
        # has no public call for it (python-tuf#1995), tufup reads the same attribute.
        return index_from_targets(updater._trusted_set.targets)


def last_verified_index(metadata_dir: Path, *, now: datetime | None = None) -> RepositoryIndex:
    """The releases of the targets metadata last verified into metadata_dir, checked
    again against the trusted root there (signatures, threshold, expiry): what the
    install step trusts, without the network."""
    try:
        root_md = Metadata[Root].from_bytes((metadata_dir / "root.json").read_bytes())
        targets_md = Metadata[Targets].from_bytes((metadata_dir / "targets.json").read_bytes())
        root_md.signed.verify_delegate(Targets.type, targets_md.signed_bytes, targets_md.signatures)
    except OSError as exc:
        raise MetadataRefused(
            f"no verified repository metadata on this machine ({exc.strerror}): download first"
        ) from None
    except (tuf_errors.RepositoryError, ValueError) as exc:
        raise MetadataRefused(f"the verified targets metadata on this machine fails its check: {exc}") from None
    targets = targets_md.signed
    if targets.is_expired(now or datetime.now(UTC)):
        raise MetadataExpired(f"targets metadata version {targets.version} expired at {_when(targets.expires)}")
    return index_from_targets(targets)


# Which role a failure concerns and why, in an operator's words: python-tuf's own
# messages name the role ("timestamp was signed by 0/1 keys"); we name the attack.
_CAUSES: tuple[tuple[type[Exception], str], ...] = (
    (tuf_errors.UnsignedMetadataError, "not signed by enough trusted keys (threshold)"),
    (tuf_errors.BadVersionNumberError, "rollback: a lower or unexpected metadata version"),
    (tuf_errors.LengthOrHashMismatchError, "mix-and-match: a file does not match the length or hash listed for it"),
)


def _refused_message(exc: tuf_errors.RepositoryError, url: str | None) -> str:
    # ngclient tries its local copies first and passes over those that fail: a
    # refusal concerns the file it fetched last, which its own messages do not name.
    cause = next((why for kind, why in _CAUSES if isinstance(exc, kind)), "invalid metadata")
    where = f" (in {url.rsplit('/', 1)[-1]})" if url else ""
    return f"repository metadata refused, {cause}: {exc}{where}"


def _expired_message(exc: Exception, server_time: datetime | None) -> str:
    now = datetime.now(UTC)
    message = f"repository metadata expired ({exc}) at this machine's time {_when(now)}"
    if server_time is not None and abs((now - server_time).total_seconds()) > CLOCK_SKEW:
        ahead = (now - server_time).total_seconds()
        side = "ahead of" if ahead > 0 else "behind"
        return (
            f"{message}: clock trouble, this machine's clock is {abs(ahead) / 60:.0f} min {side} "
            f"the repository server's ({_when(server_time)})"
        )
    return f"{message}: the repository is not being re-signed (a frozen or stale mirror, or the timestamp beat stopped)"


def _when(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
