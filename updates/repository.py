"""Building and signing the update repository on The Update Framework (python-tuf):
``manage.py build_repo``, ``manage.py repo_keys``, the beat's re-signing, the demo.

Readers (the agents, ``sync_releases``) are in agent/shared/repository.py. Layout::

    OUT/metadata/N.root.json        every root version (a reader walks them in order)
    OUT/metadata/N.targets.json     consistent snapshots: a new version, a new file
    OUT/metadata/N.snapshot.json
    OUT/metadata/timestamp.json     the one file replaced in place, written last
    OUT/targets/releases/<release>/<sha256>.<name>_<version>.tar.gz

A publication writes the packages, then targets, then snapshot, then the
timestamp (one atomic rename): a reader sees the old set or the new one, never a
mix. Files are never rewritten, so a reader in the middle of the old set finishes it.

Keys: each in its own file ``KEYS_DIR/<role>-<keyid>.key`` (PEM, 0600). Which is needed
for what (README, "Repository keys"): root to change keys or thresholds (offline),
targets to publish releases (offline between releases), snapshot and timestamp online
on the control host, for the beat that re-signs them before they expire.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from agent.shared import signing
from agent.shared.files import atomic_write, atomic_write_stream, hash_file
from agent.shared.protocol import CHANNELS, VERSION_RE, version_key
from agent.shared.repository import (
    METADATA_DIR,
    PACKAGE_SUFFIX,
    RELEASE_META,
    TARGETS_DIR,
    IndexFormatError,
    PackageEntry,
    ReleaseEntry,
    RepositoryError,
    RepositoryIndex,
    custom_fields,
    index_from_targets,
    target_path,
    validate_package_name,
    validate_version,
)

log = logging.getLogger(__name__)
ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
# How long each role's signature holds. The online roles are re-signed by the beat
# (control.resign_repository) when half of this has passed; a reader that gets no new
# timestamp for a day stops (an indefinite freeze is one day at most).
EXPIRY = {
    Root.type: timedelta(days=365),
    Targets.type: timedelta(days=365),
    Snapshot.type: timedelta(days=7),
    Timestamp.type: timedelta(days=1),
}
ONLINE = (Snapshot.type, Timestamp.type)
_JSON = JSONSerializer(compact=False)


# --------------------------------------------------------------------------- keys


# Where keys are looked for: one directory, or several in order (the offline media
# given with --keys-dir first, then TGP_REPO_KEYS_DIR with the online keys). New keys
# are written to the first.
KeyDirs = Path | Sequence[Path]


def _dirs(keys_dir: KeyDirs) -> tuple[Path, ...]:
    return (Path(keys_dir),) if isinstance(keys_dir, str | Path) else tuple(Path(d) for d in keys_dir)


def key_file(keys_dir: Path, role: str, keyid: str) -> Path:
    return Path(keys_dir) / f"{role}-{keyid}.key"


def find_key(keys_dir: KeyDirs, role: str, keyid: str) -> Path | None:
    return next((path for d in _dirs(keys_dir) if (path := key_file(d, role, keyid)).is_file()), None)


def new_key(keys_dir: KeyDirs, role: str) -> SSlibKey:
    """A new Ed25519 key for role, in its own file named by role and keyid."""
    keys_dir = _dirs(keys_dir)[0]
    tmp = keys_dir / f".new-{uuid.uuid4().hex}.key"
    private = signing.create_private(tmp)
    public = SSlibKey.from_crypto(private.public_key())
    os.rename(tmp, key_file(keys_dir, role, public.keyid))
    return public


def _signer(path: Path) -> CryptoSigner:
    try:
        private = signing.load_private(path)
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"signing key {path}: {exc}") from exc
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


def signers(root: Root, role: str, keys_dir: KeyDirs) -> list[CryptoSigner]:
    """The keys of role that are here; RepositoryError if fewer than its threshold."""
    wanted = root.roles[role]
    found = [find_key(keys_dir, role, keyid) for keyid in wanted.keyids]
    here = [_signer(path) for path in found if path is not None]
    if len(here) < wanted.threshold:
        where = " or ".join(str(d) for d in _dirs(keys_dir))
        raise RepositoryError(
            f"the {role} role needs {wanted.threshold} of its keys to sign, {len(here)} found in {where} "
            f"(keyids {', '.join(sorted(wanted.keyids))}); bring the offline keys (--keys-dir)"
        )
    return here


# --------------------------------------------------------------------------- store


class Store:
    """One repository directory: the current metadata of each role, and writing new versions."""

    def __init__(self, out: Path, keys_dir: KeyDirs) -> None:
        self.out, self.keys_dir = Path(out), _dirs(keys_dir)
        self.meta_dir = self.out / METADATA_DIR

    def root_files(self) -> list[Path]:
        """Every root version's file, oldest first (a reader walks them in this order)."""
        found = [p for p in self.meta_dir.glob("*.root.json") if p.name.split(".")[0].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split(".")[0]))

    def root_version(self) -> int:
        files = self.root_files()
        return int(files[-1].name.split(".")[0]) if files else 0

    def root_file(self) -> Path:
        """The current root's file; RepositoryError if there is none yet."""
        files = self.root_files()
        if not files:
            raise RepositoryError(f"{self.out} is not a repository yet (no root metadata): run build_repo")
        return files[-1]

    def root(self) -> Metadata[Root]:
        return self._read(self.root_file().name, Root)

    def timestamp(self) -> Metadata[Timestamp] | None:
        path = self.meta_dir / "timestamp.json"
        return self._read(path.name, Timestamp) if path.exists() else None

    def snapshot(self) -> Metadata[Snapshot] | None:
        timestamp = self.timestamp()
        if timestamp is None:
            return None
        return self._read(f"{timestamp.signed.snapshot_meta.version}.snapshot.json", Snapshot)

    def targets(self) -> Metadata[Targets] | None:
        snapshot = self.snapshot()
        if snapshot is None:
            return None
        return self._read(f"{snapshot.signed.meta['targets.json'].version}.targets.json", Targets)

    def _read(self, name: str, kind: type[Any]) -> Any:
        try:
            return Metadata[kind].from_file(str(self.meta_dir / name))  # type: ignore[valid-type]
        except Exception as exc:  # noqa: BLE001 - python-tuf raises several kinds for a broken file
            raise RepositoryError(f"cannot read {self.meta_dir / name}: {exc}") from exc

    def sign(self, md: Metadata[Any], root: Root, role: str) -> bytes:
        md.signatures.clear()
        for signer in signers(root, role, self.keys_dir):
            md.sign(signer, append=True)
        return md.to_bytes(_JSON)

    def write(self, name: str, data: bytes) -> None:
        path = self.meta_dir / name
        if path.exists() and name != "timestamp.json":
            raise RepositoryError(f"{path} exists already; versions are never rewritten")
        atomic_write(path, data)


def _expiry(now: datetime, role: str) -> datetime:
    return (now + EXPIRY[role]).replace(microsecond=0)


def _now(now: datetime | None) -> datetime:
    return (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)


def _meta(version: int, data: bytes) -> MetaFile:
    # Length and hash as well as the version: the exact bytes a reader must get (no
    # endless data, no mix-and-match even where a version number is reused).
    return MetaFile(version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()})


# --------------------------------------------------------------------------- root


def init_repository(out: Path, keys_dir: KeyDirs, *, now: datetime | None = None) -> Root:
    """The repository's first root (one new key for each role, threshold 1), unless it has one."""
    store = Store(out, keys_dir)
    if store.root_version():
        return store.root().signed
    now = _now(now)
    root = Root(version=1, expires=_expiry(now, Root.type), consistent_snapshot=True)
    for role in ROLES:
        root.add_key(new_key(keys_dir, role), role)
    store.write("1.root.json", store.sign(Metadata(root), root, Root.type))
    return root


def trusted_root(out: Path) -> bytes:
    """The current root's bytes: what a new node or a new control host pins."""
    return Store(out, ()).root_file().read_bytes()


def export_root(out: Path, dest: Path) -> None:
    atomic_write(Path(dest), trusted_root(out))


def rotate_keys(
    out: Path,
    keys_dir: KeyDirs,
    role: str,
    *,
    count: int = 1,
    threshold: int | None = None,
    keep_old: bool = False,
    now: datetime | None = None,
) -> Root:
    """A new root version in which role has `count` new keys (and, unless keep_old, none
    of its old ones) and the given threshold; role's metadata is signed again with them.
    Signed by the old root's keys and, for a root rotation, the new ones too, as readers check."""
    if role not in ROLES:
        raise RepositoryError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    store, now = Store(out, keys_dir), _now(now)
    old, published = store.root(), store.targets()
    root = Root.from_dict(old.signed.to_dict())
    old_ids = list(root.roles[role].keyids)
    keys_after = count + (len(old_ids) if keep_old else 0)
    new_threshold = threshold if threshold is not None else min(root.roles[role].threshold, keys_after)
    _check_threshold(role, new_threshold, keys_after)
    # Every signing key must be here before the first file is written: a new root whose
    # role metadata could not be signed again would leave readers refusing the repository.
    old_signers = signers(old.signed, Root.type, keys_dir)
    if published is not None:
        for other in {Targets.type: ONLINE, Snapshot.type: (Timestamp.type,)}.get(role, ()):
            signers(old.signed, other, keys_dir)
    for keyid in [] if keep_old else old_ids:
        root.revoke_key(keyid, role)
    for _ in range(count):
        root.add_key(new_key(keys_dir, role), role)
    root.roles[role].threshold = new_threshold
    root.version += 1
    root.expires = _expiry(now, Root.type)
    md = Metadata(root)
    for signer in old_signers:
        md.sign(signer, append=True)
    for signer in signers(root, Root.type, keys_dir):
        if signer.public_key.keyid not in md.signatures:
            md.sign(signer, append=True)
    store.write(f"{root.version}.root.json", md.to_bytes(_JSON))
    if published is not None and role == Targets.type:
        _publish_targets(store, root, dict(published.signed.targets), now)
    elif published is not None and role in ONLINE:
        _publish_online(store, root, now, snapshot=role == Snapshot.type)
    return root


def _check_threshold(role: str, threshold: int, keys: int) -> None:
    if threshold < 1:
        raise RepositoryError(f"threshold must be at least 1, got {threshold}")
    if threshold > keys:
        raise RepositoryError(f"the {role} role would have {keys} key(s): a threshold of {threshold} cannot be met")


# --------------------------------------------------------------------------- publish


def build_repository(source: Path, out: Path, keys_dir: KeyDirs, *, now: datetime | None = None) -> RepositoryIndex:
    """Publish the releases of the source tree: new targets, snapshot and timestamp
    versions. A release no longer in the source is no longer listed (withdrawn)."""
    source, out, now = Path(source), Path(out), _now(now)
    # Everything that can fail is checked before the first byte is written to OUT.
    releases, files = _scan_source(source)
    root = init_repository(out, keys_dir, now=now)
    store = Store(out, keys_dir)
    for role in (Targets.type, *ONLINE):  # the root key may stay offline
        signers(root, role, keys_dir)
    targets: dict[str, TargetFile] = {}
    for release in releases:
        for package in release.packages:
            targets[package.file] = TargetFile(
                length=package.size,
                hashes={"sha256": package.sha256},
                path=package.file,
                unrecognized_fields={"custom": custom_fields(release, package)},
            )
    _write_targets_files(out, releases, files)
    return _publish_targets(store, root, targets, now)


def _publish_targets(store: Store, root: Root, targets: dict[str, TargetFile], now: datetime) -> RepositoryIndex:
    current = store.targets()
    version = current.signed.version + 1 if current is not None else 1
    signed = Targets(version=version, expires=_expiry(now, Targets.type),
                     targets=targets)  # fmt: skip
    data = store.sign(Metadata(signed), root, Targets.type)
    store.write(f"{version}.targets.json", data)
    _publish_online(store, root, now, snapshot=True, targets=_meta(version, data))
    return index_from_targets(signed)


def _publish_online(
    store: Store, root: Root, now: datetime, *, snapshot: bool, targets: MetaFile | None = None
) -> None:
    """A new snapshot (if asked) and always a new timestamp, the latter written last."""
    old_ts = store.timestamp()
    snapshot_meta = old_ts.signed.snapshot_meta if old_ts is not None else None
    if snapshot:
        old = store.snapshot()
        meta = dict(old.signed.meta) if old is not None else {}
        if targets is not None:
            meta["targets.json"] = targets
        version = old.signed.version + 1 if old is not None else 1
        signed = Snapshot(version=version, expires=_expiry(now, Snapshot.type),
                          meta=meta)  # fmt: skip
        data = store.sign(Metadata(signed), root, Snapshot.type)
        store.write(f"{version}.snapshot.json", data)
        snapshot_meta = _meta(version, data)
    assert snapshot_meta is not None
    ts_version = old_ts.signed.version + 1 if old_ts is not None else 1
    ts = Timestamp(version=ts_version, expires=_expiry(now, Timestamp.type),
                   snapshot_meta=snapshot_meta)  # fmt: skip
    store.write("timestamp.json", store.sign(Metadata(ts), root, Timestamp.type))


def resign_online(out: Path, keys_dir: KeyDirs, *, now: datetime | None = None, force: bool = False) -> list[str]:
    """Sign snapshot and timestamp again when half of their lifetime has passed (the beat's
    work; needs only the online keys). Returns the roles signed again."""
    store, now = Store(out, keys_dir), _now(now)
    timestamp, snapshot = store.timestamp(), store.snapshot()
    if timestamp is None or snapshot is None:
        raise RepositoryError(f"{out} has nothing published yet: run build_repo")
    root = store.root().signed
    stale_snapshot = force or snapshot.signed.expires - now < EXPIRY[Snapshot.type] / 2
    if not (stale_snapshot or timestamp.signed.expires - now < EXPIRY[Timestamp.type] / 2):
        return []
    _publish_online(store, root, now, snapshot=stale_snapshot)
    return [Snapshot.type, Timestamp.type] if stale_snapshot else [Timestamp.type]


def resign_configured() -> list[str]:
    """resign_online for this host's repository (TGP_REPO_DIR, TGP_REPO_KEYS_DIR), if it
    keeps one. A failure is logged as an error: without a new timestamp within a day,
    every node refuses the repository (by design: that is what stops a freeze)."""
    from django.conf import settings

    out = Path(settings.TGP_REPO_DIR)
    if not (out / METADATA_DIR / "timestamp.json").exists():
        return []
    try:
        roles = resign_online(out, settings.TGP_REPO_KEYS_DIR)
    except RepositoryError as exc:
        log.error("the repository's online roles could not be signed again: %s", exc)
        raise
    if roles:
        log.info("signed again: %s", ", ".join(roles))
    return roles


@dataclass(frozen=True)
class RoleState:
    role: str
    version: int | None
    expires: datetime | None
    threshold: int
    keyids: tuple[str, ...]
    here: tuple[str, ...]  # keyids whose private key is in the keys directory


def describe(out: Path, keys_dir: KeyDirs) -> list[RoleState]:
    """Each role: its current version and expiry, threshold, keys, and which keys are here."""
    store = Store(out, keys_dir)
    root_md = store.root()
    current = {Root.type: root_md, Timestamp.type: store.timestamp(), Snapshot.type: store.snapshot(),
               Targets.type: store.targets()}  # fmt: skip
    states = []
    for role in ROLES:
        md, spec = current[role], root_md.signed.roles[role]
        states.append(
            RoleState(
                role=role,
                version=md.signed.version if md is not None else None,
                expires=md.signed.expires if md is not None else None,
                threshold=spec.threshold,
                keyids=tuple(spec.keyids),
                here=tuple(k for k in spec.keyids if find_key(keys_dir, role, k) is not None),
            )
        )
    return states


# --------------------------------------------------------------------------- source tree


@dataclass(frozen=True)
class _SourcePackage:
    entry: PackageEntry
    path: Path


def _scan_source(source: Path) -> tuple[tuple[ReleaseEntry, ...], dict[str, Path]]:
    if not source.is_dir():
        raise IndexFormatError(f"source directory {source} does not exist")
    releases: list[ReleaseEntry] = []
    files: dict[str, Path] = {}
    seen_versions: dict[str, Path] = {}
    for channel_dir in _sorted_children(source):
        if channel_dir.name not in CHANNELS or not channel_dir.is_dir():
            raise IndexFormatError(f"{channel_dir}: expected only the channel directories {CHANNELS}")
        for release_dir in _sorted_children(channel_dir):
            release, packages = _scan_release(release_dir, channel_dir.name)
            if release.version in seen_versions:
                raise IndexFormatError(
                    f"{release_dir}: release {release.version} also exists at {seen_versions[release.version]}"
                )
            seen_versions[release.version] = release_dir
            files |= {p.entry.file: p.path for p in packages}
            releases.append(release)
    if not releases:
        raise IndexFormatError(f"source directory {source} holds no releases")
    releases.sort(key=lambda r: (version_key(r.version), r.channel))
    return tuple(releases), files


def _sorted_children(path: Path) -> list[Path]:
    return sorted(path.iterdir(), key=lambda p: p.name)


def _scan_release(release_dir: Path, channel: str) -> tuple[ReleaseEntry, list[_SourcePackage]]:
    version = release_dir.name
    if not release_dir.is_dir() or not VERSION_RE.match(version):
        raise IndexFormatError(f"{release_dir}: expected a release directory named like 2.1.0")
    meta: dict[str, Any] = {}
    packages: list[_SourcePackage] = []
    for path in _sorted_children(release_dir):
        if path.name == RELEASE_META:
            meta = _read_release_meta(path)
        else:
            packages.append(_scan_package(path, version))
    if not packages:
        raise IndexFormatError(f"{release_dir}: release has no packages")
    names = [p.entry.name for p in packages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise IndexFormatError(f"{release_dir}: package(s) {', '.join(dupes)} present in several versions")
    release = ReleaseEntry(
        version=version,
        channel=channel,
        needs_reboot=meta.get("needs_reboot", True),
        hotfix=meta.get("hotfix", False),
        notes=meta.get("notes", ""),
        packages=tuple(sorted((p.entry for p in packages), key=lambda e: e.name)),
    )
    return release, packages


def _read_release_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IndexFormatError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise IndexFormatError(f"{path}: expected a JSON object")
    types = {"notes": str, "needs_reboot": bool, "hotfix": bool}
    for key, value in data.items():
        if key not in types:
            raise IndexFormatError(f"{path}: unknown field {key!r} (allowed: {', '.join(types)})")
        if not isinstance(value, types[key]):
            raise IndexFormatError(f"{path}: field {key!r} must be {types[key].__name__}")
    return data


def _scan_package(path: Path, release: str) -> _SourcePackage:
    name, version = _parse_package_filename(path)
    if not path.is_file() or path.is_symlink():
        raise IndexFormatError(f"{path}: packages must be regular files")
    size, sha256 = hash_file(path)
    entry = PackageEntry(name=name, version=version, file=target_path(release, name, version), size=size, sha256=sha256)
    return _SourcePackage(entry=entry, path=path)


def _parse_package_filename(path: Path) -> tuple[str, str]:
    filename = path.name
    stem = filename[: -len(PACKAGE_SUFFIX)] if filename.endswith(PACKAGE_SUFFIX) else None
    if stem is None or stem.count("_") != 1:
        raise IndexFormatError(f"{path}: expected a package file named <name>_<version>{PACKAGE_SUFFIX}")
    name, version = stem.split("_")
    try:
        validate_package_name(name)
        validate_version(version, "package")
    except IndexFormatError as exc:
        raise IndexFormatError(f"{path}: {exc}") from None
    return name, version


def _write_targets_files(out: Path, releases: tuple[ReleaseEntry, ...], files: dict[str, Path]) -> None:
    # Named by their hash, so a file that is there is already right: never rewritten.
    for release in releases:
        for entry in release.packages:
            directory, _, filename = entry.file.rpartition("/")
            dest = out / TARGETS_DIR / directory / f"{entry.sha256}.{filename}"
            if not dest.is_file():
                with files[entry.file].open("rb") as fh:
                    atomic_write_stream(dest, [fh])
