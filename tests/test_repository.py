"""The update repository on TUF: building and signing (updates/repository.py), keys and
their rotation, re-signing, what readers accept over real HTTP (agent/shared/repository.py),
and the commands build_repo, repo_keys and sync_releases."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.management import CommandError, call_command
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from agent.shared import signing
from agent.shared.protocol import version_key
from agent.shared.repository import (
    FetchError,
    IndexFormatError,
    MetadataExpired,
    MetadataRefused,
    PackageEntry,
    PackageVerificationError,
    ReleaseWithdrawn,
    RepositoryError,
    index_from_targets,
    last_verified_index,
    package_url,
    trusted_index,
    validate_package_name,
    verify_package,
)
from tests.servers import RepoServer
from updates.demo import DEMO_RELEASES, write_demo_sources
from updates.repository import (
    Store,
    build_repository,
    describe,
    export_root,
    resign_configured,
    resign_online,
    rotate_keys,
    signers,
    trusted_root,
)

pytestmark = pytest.mark.timeout(60)

# A release of our own beside the demo's: every field of release.json differs from its default.
HOTFIX = ("stable", "2.2.1", {"notes": "Fixes CVE-2030-0001.", "needs_reboot": False, "hotfix": True})


def now() -> datetime:
    """The real time: readers check expiry by this machine's clock."""
    return datetime.now(UTC).replace(microsecond=0)


def add_release(source: Path, channel: str, version: str, meta: dict[str, Any] | None = None,
                packages: tuple[str, ...] = ("tgpro-base",)) -> Path:  # fmt: skip
    release = source / channel / version
    release.mkdir(parents=True)
    for name in packages:
        (release / f"{name}_{version}.tar.gz").write_bytes(f"{name} {version}\n".encode() * 64)
    if meta is not None:
        (release / "release.json").write_text(json.dumps(meta))
    return release


class Site:
    """A source tree, the repository built from it (keys beside it), served over loopback
    HTTP; `pin` is its first root, as a node pinned it at enrollment."""

    def __init__(self, base: Path, url: str) -> None:
        self.base, self.url = base, url
        self.source, self.out, self.keys = base / "src", base / "out", base / "keys"
        self.meta = self.out / "metadata"

    def publish(self, **kw: Any) -> Any:
        return build_repository(self.source, self.out, self.keys, **kw)

    @property
    def pin(self) -> bytes:
        return (self.meta / "1.root.json").read_bytes()

    def reader_dir(self, reader: str) -> Path:
        return self.base / "readers" / reader

    def read(self, reader: str = "node", root: bytes | None = None) -> Any:
        """A reader's refresh (TUF's client workflow) over HTTP, as the agent's."""
        with httpx.Client(timeout=5) as client:
            return trusted_index(self.reader_dir(reader), self.url, root or self.pin, client=client)

    def seen(self, reader: str, role: str) -> int:
        """The version of role the reader verified last."""
        return Metadata.from_file(str(self.reader_dir(reader) / f"{role}.json")).signed.version

    def key_files(self, role: str) -> set[Path]:
        return set(self.keys.glob(f"{role}-*.key"))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with RepoServer(tmp_path / "out") as server:
        s = Site(tmp_path, server.url)
        write_demo_sources(s.source, package_bytes=2048)
        add_release(s.source, HOTFIX[0], HOTFIX[1], HOTFIX[2])
        s.publish()
        yield s


def tree(*dirs: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under dirs, with its inode: a file rewritten in place or renamed over shows."""
    files = [p for d in dirs if d.exists() for p in sorted(d.rglob("*")) if p.is_file()]
    return {str(p): (p.stat().st_ino, p.read_bytes()) for p in files}


def file_signer(path: Path) -> CryptoSigner:
    private = signing.load_private(path)
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


def publish_by_hand(site: Site, targets_keys: list[Path], mutate: Callable[[Targets], None] | None = None) -> int:
    """A new targets version signed by exactly targets_keys (snapshot and timestamp by the
    repository's own online keys): what an attacker holding those keys could publish."""
    store = Store(site.out, site.keys)
    root = store.root().signed
    targets = store.targets()
    assert targets is not None
    targets.signed.version += 1
    if mutate:
        mutate(targets.signed)
    targets.signatures.clear()
    for key in targets_keys:
        targets.sign(file_signer(key), append=True)
    data = targets.to_bytes(JSONSerializer())
    (site.meta / f"{targets.signed.version}.targets.json").write_bytes(data)
    snapshot = store.snapshot()
    assert snapshot is not None
    snapshot.signed.version += 1
    snapshot.signed.meta["targets.json"] = MetaFile(
        targets.signed.version, len(data), {"sha256": hashlib.sha256(data).hexdigest()}
    )
    snap_data = store.sign(snapshot, root, Snapshot.type)
    (site.meta / f"{snapshot.signed.version}.snapshot.json").write_bytes(snap_data)
    timestamp = store.timestamp()
    assert timestamp is not None
    timestamp.signed.version += 1
    timestamp.signed.snapshot_meta = MetaFile(
        snapshot.signed.version, len(snap_data), {"sha256": hashlib.sha256(snap_data).hexdigest()}
    )
    (site.meta / "timestamp.json").write_bytes(store.sign(timestamp, root, Timestamp.type))
    return targets.signed.version


def run_cli(*args: Any) -> str:
    out = StringIO()
    call_command(*[str(a) for a in args], stdout=out, stderr=StringIO())
    return out.getvalue()


# --------------------------------------------------------------------------- names and versions


def test_version_key_orders_numerically_not_lexically():
    assert version_key("2.10.1") > version_key("2.9.0")
    assert version_key("2.1.0.3") > version_key("2.1.0")
    assert sorted(["2.2.0", "2.10.0", "2.1.0", "10.0"], key=version_key) == ["2.1.0", "2.2.0", "2.10.0", "10.0"]
    for bad in ["", "2.x", "v2.1", "1.2.3.4.5", "2..1", "-1"]:
        with pytest.raises(ValueError):
            version_key(bad)


@pytest.mark.parametrize("bad", ["", "a", "../x", "a/b", "Tgpro", "tgpro_base", ".hidden", "-x", "x" * 64])
def test_hostile_package_names_are_rejected(bad):
    with pytest.raises(IndexFormatError):
        validate_package_name(bad)


def test_debian_style_package_names_are_accepted():
    for good in ["tgpro-base", "libc6", "g++", "python3.11"]:
        assert validate_package_name(good) == good


def test_demo_sources_are_deterministic(tmp_path):
    write_demo_sources(tmp_path / "a", package_bytes=2048)
    write_demo_sources(tmp_path / "b", package_bytes=2048)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files_a
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_package_url_is_the_hash_prefixed_file_of_the_consistent_snapshot():
    entry = PackageEntry("tgpro-base", "2.1.0", "releases/2.2.0/tgpro-base_2.1.0.tar.gz", 1, "ab" * 32)
    expected = f"http://repo/x/targets/releases/2.2.0/{'ab' * 32}.tgpro-base_2.1.0.tar.gz"
    assert package_url("http://repo/x/", entry) == expected
    assert package_url("http://repo/x", entry) == expected


# --------------------------------------------------------------------------- build, then read over HTTP


def test_a_built_repository_verifies_over_http_and_lists_the_releases_with_their_metadata(site):
    index = site.read()
    assert index.serial == 1
    listed = {r.version: r for r in index.releases}
    assert set(listed) == {v for _, v, *_ in DEMO_RELEASES} | {HOTFIX[1]}
    for channel, version, needs_reboot, hotfix, notes, packages in DEMO_RELEASES:
        release = listed[version]
        assert (release.channel, release.needs_reboot, release.hotfix, release.notes) == (
            channel, needs_reboot, hotfix, notes,
        )  # fmt: skip
        assert {p.name: p.version for p in release.packages} == packages
    own = listed[HOTFIX[1]]
    assert (own.channel, own.notes, own.needs_reboot, own.hotfix) == ("stable", "Fixes CVE-2030-0001.", False, True)
    assert index.newest("stable").version == "2.2.1" and index.newest("oldstable").version == "2.0.0"
    # Every package is served at its URL with the signed length and hash.
    entry = next(p for p in listed["2.2.0"].packages if p.name == "tgpro-base")
    assert (entry.version, entry.file) == ("2.1.0", "releases/2.2.0/tgpro-base_2.1.0.tar.gz")
    served = httpx.get(package_url(site.url, entry), timeout=5).content
    assert len(served) == entry.size and hashlib.sha256(served).hexdigest() == entry.sha256


def test_release_json_is_optional_and_its_defaults_are_reboot_no_hotfix_no_notes(tmp_path):
    add_release(tmp_path / "src", "stable", "2.1.0")
    release = build_repository(tmp_path / "src", tmp_path / "out", tmp_path / "keys").release("2.1.0")
    assert (release.notes, release.needs_reboot, release.hotfix) == ("", True, False)


def test_unknown_release_is_an_error_and_an_empty_channel_has_no_newest(site):
    index = site.read()
    with pytest.raises(
        ReleaseWithdrawn,
        match=r"release 9.9 was withdrawn from the repository: its signed targets \(version 1\) do not list it",
    ):
        index.release("9.9")
    assert index.newest("nightly") is None


def test_the_first_build_makes_one_owner_only_key_file_per_role_named_by_role_and_keyid(site):
    root = Metadata[Root].from_file(str(site.meta / "1.root.json")).signed
    assert root.consistent_snapshot
    files = sorted(p.name for p in site.keys.iterdir())
    expected = sorted(f"{role}-{keyid}.key" for role, spec in root.roles.items() for keyid in spec.keyids)
    assert files == expected and len(files) == 4
    for path in site.keys.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert all(spec.threshold == 1 for spec in root.roles.values())


def test_consistent_snapshots_name_metadata_by_version_and_packages_by_hash(site):
    assert sorted(p.name for p in site.meta.iterdir()) == [
        "1.root.json", "1.snapshot.json", "1.targets.json", "timestamp.json",
    ]  # fmt: skip
    targets = Store(site.out, site.keys).targets()
    assert targets is not None
    served = sorted(p.relative_to(site.out / "targets").as_posix() for p in (site.out / "targets").rglob("*.tar.gz"))
    expected = []
    for path, info in targets.signed.targets.items():
        directory, _, name = path.rpartition("/")
        expected.append(f"{directory}/{info.hashes['sha256']}.{name}")
        data = (site.out / "targets" / directory / f"{info.hashes['sha256']}.{name}").read_bytes()
        assert hashlib.sha256(data).hexdigest() == info.hashes["sha256"] and len(data) == info.length
    assert served == sorted(expected)
    assert not list(site.out.rglob("*.tmp")) and not list(site.out.rglob(".*"))


def test_every_publication_raises_the_versions_and_never_rewrites_a_versioned_file(site):
    before = tree(site.out)
    index = site.publish()
    assert index.serial == 2
    after = tree(site.out)
    ts = str(site.meta / "timestamp.json")
    assert {k: v for k, v in before.items() if k != ts} == {k: after[k] for k in before if k != ts}
    assert sorted(set(after) - set(before)) == [str(site.meta / "2.snapshot.json"), str(site.meta / "2.targets.json")]
    store = Store(site.out, site.keys)
    assert (store.timestamp().signed.version, store.snapshot().signed.version, store.targets().signed.version) == (
        2, 2, 2,
    )  # fmt: skip
    assert site.read().serial == 2


def test_a_publication_writes_the_timestamp_last_after_everything_it_names(site, monkeypatch):
    from updates import repository

    add_release(site.source, "stable", "2.3.0", {"notes": "new"})
    written: list[str] = []
    real_write, real_stream = repository.atomic_write, repository.atomic_write_stream

    def check_complete(data: bytes) -> None:
        # At the moment the timestamp goes out, everything a reader follows from it is there.
        timestamp = Metadata[Timestamp].from_bytes(data).signed
        snapshot = Metadata[Snapshot].from_file(str(site.meta / f"{timestamp.snapshot_meta.version}.snapshot.json"))
        version = snapshot.signed.meta["targets.json"].version
        targets = Metadata[Targets].from_file(str(site.meta / f"{version}.targets.json")).signed
        assert "releases/2.3.0/tgpro-base_2.3.0.tar.gz" in targets.targets
        for path, info in targets.targets.items():
            directory, _, name = path.rpartition("/")
            assert (site.out / "targets" / directory / f"{info.hashes['sha256']}.{name}").is_file(), path

    def write(dest: Path, data: bytes, **kw: Any) -> None:
        if Path(dest).name == "timestamp.json":
            check_complete(data)
        written.append(Path(dest).name)
        real_write(dest, data, **kw)

    def write_stream(dest: Path, parts: Any, **kw: Any) -> None:
        written.append(Path(dest).name)
        real_stream(dest, parts, **kw)

    monkeypatch.setattr(repository, "atomic_write", write)
    monkeypatch.setattr(repository, "atomic_write_stream", write_stream)
    site.publish()
    assert written[-1] == "timestamp.json" and written.count("timestamp.json") == 1
    assert written[-3:-1] == ["2.targets.json", "2.snapshot.json"]
    assert any(name.endswith(".tgpro-base_2.3.0.tar.gz") for name in written[:-3]), written


def test_a_release_removed_from_the_source_is_no_longer_listed(site):
    shutil.rmtree(site.source / "stable" / "2.2.0")
    index = site.publish()
    assert "2.2.0" not in {r.version for r in index.releases}
    assert "2.2.0" not in {r.version for r in site.read().releases}


# --------------------------------------------------------------------------- bad source trees


def _refused(source: Path, out: Path, keys: Path, *path_parts: str) -> str:
    with pytest.raises(IndexFormatError) as exc_info:
        build_repository(source, out, keys)
    message = str(exc_info.value)
    for part in path_parts:
        assert part in message, message
    return message


@pytest.mark.parametrize(
    "filename",
    ["../evil_1.0.tar.gz", "Tgpro-base_1.0.tar.gz", "tgpro_base_1.0.tar.gz", "tgpro-base_1.0.zip", "x_1.0.tar.gz",
     "tgpro-base_2.x.tar.gz"],
)  # fmt: skip
def test_a_bad_package_file_name_is_refused_naming_it_and_nothing_is_written(tmp_path, filename):
    rel = add_release(tmp_path / "src", "stable", "2.1.0")
    bad = rel / filename
    bad.write_bytes(b"evil")
    _refused(tmp_path / "src", tmp_path / "out", tmp_path / "keys", str(bad.resolve().relative_to(tmp_path)))
    assert not (tmp_path / "out").exists() and not (tmp_path / "keys").exists()


@pytest.mark.parametrize(
    ("layout", "offender", "why"),
    [
        ("nightly/2.1.0/tgpro-base_2.1.0.tar.gz", "src/nightly", "expected only the channel directories"),
        ("stable/latest/tgpro-base_2.1.0.tar.gz", "src/stable/latest", "expected a release directory"),
        ("README", "src/README", "expected only the channel directories"),
        ("stable/notes.txt", "src/stable/notes.txt", "expected a release directory"),
    ],
)
def test_a_bad_source_layout_is_refused_naming_the_path_and_nothing_is_written(tmp_path, layout, offender, why):
    path = tmp_path / "src" / layout
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    _refused(tmp_path / "src", tmp_path / "out", tmp_path / "keys", str(tmp_path / offender), why)
    assert not (tmp_path / "out").exists() and not (tmp_path / "keys").exists()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ('{"needs_reboot": "yes"}', "field 'needs_reboot' must be bool"),
        ('{"notes": 3}', "field 'notes' must be str"),
        ('{"colour": "red"}', "unknown field 'colour'"),
        ("[]", "expected a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_bad_release_json_is_refused_naming_it_and_nothing_is_written(tmp_path, content, why):
    rel = add_release(tmp_path / "src", "stable", "2.1.0")
    (rel / "release.json").write_text(content)
    _refused(tmp_path / "src", tmp_path / "out", tmp_path / "keys", str(rel / "release.json"), why)
    assert not (tmp_path / "out").exists()


def test_the_same_release_version_in_two_channels_is_refused(tmp_path):
    first = add_release(tmp_path / "src", "oldstable", "2.1.0")
    second = add_release(tmp_path / "src", "stable", "2.1.0")
    _refused(tmp_path / "src", tmp_path / "out", tmp_path / "keys", str(second), f"also exists at {first}")
    assert not (tmp_path / "out").exists()


def test_one_package_in_two_versions_in_a_release_is_refused(tmp_path):
    rel = add_release(tmp_path / "src", "stable", "2.1.0")
    (rel / "tgpro-base_2.0.9.tar.gz").write_bytes(b"older")
    _refused(tmp_path / "src", tmp_path / "out", tmp_path / "keys", str(rel), "tgpro-base present in several versions")
    assert not (tmp_path / "out").exists()


def test_a_release_without_packages_is_refused(tmp_path):
    rel = tmp_path / "src" / "stable" / "2.1.0"
    rel.mkdir(parents=True)
    (rel / "release.json").write_text("{}")
    _refused(tmp_path / "src", tmp_path / "out", tmp_path / "keys", str(rel), "release has no packages")
    assert not (tmp_path / "out").exists()


def test_a_symlinked_package_is_refused(tmp_path):
    rel = add_release(tmp_path / "src", "stable", "2.1.0")
    (tmp_path / "elsewhere").write_bytes(b"x")
    (rel / "tgpro-vnc_2.1.0.tar.gz").symlink_to(tmp_path / "elsewhere")
    _refused(tmp_path / "src", tmp_path / "out", tmp_path / "keys", "tgpro-vnc_2.1.0.tar.gz", "regular files")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("empty", ["missing", "no channels", "empty channel"])
def test_an_empty_or_missing_source_is_refused(tmp_path, empty):
    source = tmp_path / "src"
    if empty != "missing":
        source.mkdir()
    if empty == "empty channel":
        (source / "stable").mkdir()
    why = "does not exist" if empty == "missing" else "holds no releases"
    _refused(source, tmp_path / "out", tmp_path / "keys", str(source), why)
    assert not (tmp_path / "out").exists() and not (tmp_path / "keys").exists()


def test_a_bad_source_changes_nothing_in_an_existing_repository(site):
    before = tree(site.out, site.keys)
    add_release(site.source, "stable", "2.3.0", {"hotfix": "yes"})
    _refused(site.source, site.out, site.keys, "release.json")
    assert tree(site.out, site.keys) == before


# --------------------------------------------------------------------------- keys needed to publish


def test_publishing_without_the_targets_key_is_refused_naming_the_role_and_keys_dir(site, tmp_path):
    (key,) = site.key_files("targets")
    key.rename(tmp_path / key.name)  # to the offline medium
    add_release(site.source, "stable", "2.3.0")
    before = tree(site.out, site.keys)
    with pytest.raises(RepositoryError, match=r"the targets role needs 1 of its keys to sign, 0 found in") as exc:
        site.publish()
    assert str(site.keys) in str(exc.value)
    assert tree(site.out, site.keys) == before


def test_publishing_needs_no_root_key(site, tmp_path):
    # The root key stays offline: only changing keys or thresholds needs it
    # (README, "Repository keys"; build_repo's help says the same).
    (key,) = site.key_files("root")
    key.rename(tmp_path / key.name)
    add_release(site.source, "stable", "2.3.0")
    assert site.publish().serial == 2
    assert site.read().newest("stable").version == "2.3.0"


@pytest.mark.django_db
def test_the_commands_take_offline_keys_from_keys_dir_and_the_online_ones_from_their_place(site, tmp_path, settings):
    # Root and targets keys on the offline medium, snapshot and timestamp where the beat signs.
    offline = tmp_path / "medium"
    offline.mkdir()
    for role in ("root", "targets"):
        for key in site.key_files(role):
            key.rename(offline / key.name)
    settings.TGP_REPO_KEYS_DIR, settings.TGP_REPO_ROOT_FILE = site.keys, tmp_path / "pinned.json"
    add_release(site.source, "stable", "2.3.0")
    with pytest.raises(CommandError, match="the targets role needs 1 of its keys"):
        run_cli("build_repo", site.source, site.out)
    run_cli("build_repo", site.source, site.out, "--keys-dir", offline)
    assert site.read().newest("stable").version == "2.3.0"

    run_cli("repo_keys", "--repo", site.out, "--keys-dir", offline, "rotate", "targets")
    (keyid,) = Store(site.out, site.keys).root().signed.roles["targets"].keyids
    assert (offline / f"targets-{keyid}.key").is_file(), "a new offline key is written to the medium"
    assert site.key_files("targets") == set()
    assert site.read().newest("stable").version == "2.3.0"


def test_signers_are_the_role_keys_that_are_here_up_to_the_threshold(site, tmp_path):
    root = Store(site.out, site.keys).root().signed
    (only,) = signers(root, "targets", site.keys)
    assert only.public_key.keyid in root.roles["targets"].keyids
    with pytest.raises(RepositoryError, match="the snapshot role needs 1"):
        signers(root, "snapshot", tmp_path / "empty")


# --------------------------------------------------------------------------- re-signing the online roles


def test_resign_does_nothing_while_the_timestamp_has_more_than_half_its_life(site):
    before = tree(site.out)
    assert resign_online(site.out, site.keys, now=now() + timedelta(hours=11)) == []
    assert tree(site.out) == before


def test_resign_signs_the_timestamp_again_after_half_its_life_and_a_reader_accepts_it(site):
    site.read()
    assert resign_online(site.out, site.keys, now=now() + timedelta(hours=13)) == ["timestamp"]
    assert not (site.meta / "2.snapshot.json").exists() and not (site.meta / "2.targets.json").exists()
    timestamp = Store(site.out, site.keys).timestamp().signed
    assert timestamp.version == 2 and timestamp.expires > now() + timedelta(hours=36)
    assert site.read().serial == 1
    assert site.seen("node", "timestamp") == 2


def test_resign_signs_the_snapshot_too_after_half_its_life_and_a_reader_accepts_it(site):
    site.read()
    assert resign_online(site.out, site.keys, now=now() + timedelta(days=4)) == ["snapshot", "timestamp"]
    assert (site.meta / "2.snapshot.json").exists() and not (site.meta / "2.targets.json").exists()
    assert site.read().serial == 1
    assert (site.seen("node", "snapshot"), site.seen("node", "timestamp")) == (2, 2)


def test_resign_force_signs_both_at_once(site):
    assert resign_online(site.out, site.keys, force=True) == ["snapshot", "timestamp"]
    assert site.read().serial == 1


def test_resign_before_anything_is_published_is_refused(tmp_path):
    with pytest.raises(RepositoryError, match="nothing published yet: run build_repo"):
        resign_online(tmp_path / "out", tmp_path / "keys")


def test_a_repository_nobody_re_signs_is_refused_as_expired_within_a_day_until_it_is_re_signed(tmp_path):
    add_release(tmp_path / "src", "stable", "2.1.0")
    build_repository(tmp_path / "src", tmp_path / "out", tmp_path / "keys", now=now() - timedelta(hours=25))
    with RepoServer(tmp_path / "out") as server, httpx.Client(timeout=5) as client:
        pin = trusted_root(tmp_path / "out")
        with pytest.raises(MetadataExpired, match="not being re-signed") as exc:
            trusted_index(tmp_path / "reader", server.url, pin, client=client)
        assert isinstance(exc.value, FetchError)  # retried: a re-signing heals it
        assert resign_online(tmp_path / "out", tmp_path / "keys") == ["timestamp"]
        assert trusted_index(tmp_path / "reader", server.url, pin, client=client).serial == 1


def test_the_beat_task_re_signs_the_configured_repository(tmp_path, settings):
    from updates.tasks import resign_repository

    settings.TGP_REPO_DIR, settings.TGP_REPO_KEYS_DIR = tmp_path / "out", tmp_path / "keys"
    assert resign_repository() == []  # no repository on this host: nothing to do
    add_release(tmp_path / "src", "stable", "2.1.0")
    build_repository(tmp_path / "src", tmp_path / "out", tmp_path / "keys", now=now() - timedelta(hours=13))
    assert resign_repository() == ["timestamp"]
    assert resign_configured() == []


def test_the_beat_task_fails_loudly_without_the_online_keys(tmp_path, settings, caplog):
    settings.TGP_REPO_DIR, settings.TGP_REPO_KEYS_DIR = tmp_path / "out", tmp_path / "keys"
    add_release(tmp_path / "src", "stable", "2.1.0")
    build_repository(tmp_path / "src", tmp_path / "out", tmp_path / "keys", now=now() - timedelta(hours=13))
    for key in (tmp_path / "keys").glob("timestamp-*.key"):
        key.unlink()
    with pytest.raises(RepositoryError, match="the timestamp role needs 1"):
        resign_configured()
    assert "could not be signed again" in caplog.text


# --------------------------------------------------------------------------- key rotation


def test_rotating_the_targets_key_makes_a_root_version_a_reader_pinned_at_v1_follows(site):
    site.read()  # a node that knows root v1 and targets v1
    old = site.key_files("targets")
    root = rotate_keys(site.out, site.keys, "targets")
    assert root.version == 2
    (new,) = site.key_files("targets") - old
    assert root.roles["targets"].keyids == [new.name.removeprefix("targets-").removesuffix(".key")]
    # The targets are signed again with the new key: a new version, the same releases.
    assert site.read().serial == 2
    assert site.seen("node", "root") == 2
    assert site.read("new-node").serial == 2  # pinned at v1 too, never saw it
    assert site.seen("new-node", "root") == 2


def test_after_a_targets_rotation_the_old_key_is_no_longer_accepted(site):
    (old,) = site.key_files("targets")
    rotate_keys(site.out, site.keys, "targets")
    site.read()
    publish_by_hand(site, [old])
    with pytest.raises(MetadataRefused, match="not signed by enough trusted keys"):
        site.read()
    with pytest.raises(MetadataRefused):
        site.read("new-node")


@pytest.mark.parametrize("role", ["snapshot", "timestamp"])
def test_rotating_an_online_key_is_followed_by_readers(site, role):
    site.read()
    old = site.key_files(role)
    root = rotate_keys(site.out, site.keys, role)
    assert set(root.roles[role].keyids).isdisjoint(p.name.split("-", 1)[1][:-4] for p in old)
    assert site.read().serial == 1
    assert site.seen("node", "root") == 2 and site.seen("node", "timestamp") == 2


def test_rotating_the_root_key_signs_root_v2_with_old_and_new_keys_and_readers_follow(site):
    site.read()
    (old,) = site.key_files("root")
    root = rotate_keys(site.out, site.keys, "root")
    (new,) = site.key_files("root") - {old}
    old_id, new_id = (p.name.removeprefix("root-").removesuffix(".key") for p in (old, new))
    v1 = Metadata[Root].from_file(str(site.meta / "1.root.json"))
    v2 = Metadata[Root].from_file(str(site.meta / "2.root.json"))
    assert root.version == v2.signed.version == 2
    assert v2.signed.roles["root"].keyids == [new_id]
    assert set(v2.signatures) == {old_id, new_id}
    v1.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # trusted by v1's keys
    v2.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)  # and by its own
    assert site.read().serial == 1 and site.seen("node", "root") == 2
    assert site.read("new-node").serial == 1 and site.seen("new-node", "root") == 2


def test_after_a_root_rotation_the_old_root_key_alone_can_change_nothing(site, tmp_path):
    (old,) = site.key_files("root")
    rotate_keys(site.out, site.keys, "root")
    (new,) = site.key_files("root") - {old}
    new.rename(tmp_path / new.name)
    before = tree(site.out, site.keys)
    with pytest.raises(RepositoryError, match="the root role needs 1 of its keys"):
        rotate_keys(site.out, site.keys, "targets")
    assert tree(site.out, site.keys) == before


@pytest.mark.parametrize("role", ["targets", "snapshot"])
def test_a_rotation_without_the_online_keys_it_signs_with_writes_nothing(site, tmp_path, role):
    # The root key on its own medium: rotating targets (or snapshot) signs snapshot and
    # timestamp again too. Without those keys there, nothing may be written: a new root
    # alone would leave every reader refusing the current targets (or snapshot).
    usb = tmp_path / "usb"
    usb.mkdir()
    for key in site.key_files("root"):
        shutil.copy(key, usb)
    site.read()
    before = tree(site.out)
    with pytest.raises(RepositoryError, match="needs 1 of its keys to sign, 0 found in"):
        rotate_keys(site.out, usb, role)
    assert tree(site.out) == before
    assert site.read().serial == 1


def test_keep_old_adds_keys_and_both_old_and_new_sign(site):
    (old,) = site.key_files("targets")
    root = rotate_keys(site.out, site.keys, "targets", keep_old=True)
    assert len(root.roles["targets"].keyids) == 2 and root.roles["targets"].threshold == 1
    assert old.name.removeprefix("targets-").removesuffix(".key") in root.roles["targets"].keyids
    assert site.read().serial == 2


def test_threshold_two_needs_both_targets_keys_to_publish(site, tmp_path):
    root = rotate_keys(site.out, site.keys, "targets", count=2, threshold=2)
    assert root.roles["targets"].threshold == 2 and len(root.roles["targets"].keyids) == 2
    targets = Store(site.out, site.keys).targets()
    assert set(targets.signatures) == set(root.roles["targets"].keyids)
    assert site.publish().serial == 3
    one, _ = sorted(site.key_files("targets") & {site.keys / f"targets-{k}.key" for k in root.roles["targets"].keyids})
    one.rename(tmp_path / one.name)
    before = tree(site.out, site.keys)
    with pytest.raises(RepositoryError, match=r"the targets role needs 2 of its keys to sign, 1 found in") as exc:
        site.publish()
    assert str(site.keys) in str(exc.value)
    assert tree(site.out, site.keys) == before


def test_a_reader_accepts_threshold_two_targets_signed_by_both_and_refuses_one_signature(site):
    root = rotate_keys(site.out, site.keys, "targets", count=2, threshold=2)
    assert site.read().serial == 2
    keys = sorted(site.keys / f"targets-{k}.key" for k in root.roles["targets"].keyids)
    assert publish_by_hand(site, keys) == 3
    assert site.read().serial == 3
    publish_by_hand(site, keys[:1])
    with pytest.raises(MetadataRefused, match="threshold"):
        site.read()


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"count": 1, "threshold": 2}, "would have 1 key"),
        ({"count": 2, "threshold": 3}, "would have 2 key"),
        ({"count": 1, "threshold": 3, "keep_old": True}, "would have 2 key"),
        ({"count": 1, "threshold": 0}, "at least 1"),
        ({"count": 0}, "at least 1"),
    ],
)
def test_a_threshold_that_cannot_be_met_is_refused_and_changes_nothing(site, kw, why):
    before = tree(site.out, site.keys)
    with pytest.raises(RepositoryError, match=why):
        rotate_keys(site.out, site.keys, "targets", **kw)
    assert tree(site.out, site.keys) == before


def test_rotating_an_unknown_role_is_refused(site):
    before = tree(site.out, site.keys)
    with pytest.raises(RepositoryError, match="unknown role 'mirror'"):
        rotate_keys(site.out, site.keys, "mirror")
    assert tree(site.out, site.keys) == before


def test_describe_reports_versions_thresholds_and_which_keys_are_here(site, tmp_path):
    rotate_keys(site.out, site.keys, "targets", count=2, threshold=2)
    (root_key,) = site.key_files("root")
    root_key.rename(tmp_path / root_key.name)
    states = {s.role: s for s in describe(site.out, site.keys)}
    assert list(states) == ["root", "targets", "snapshot", "timestamp"]
    assert {r: (s.version, s.threshold, len(s.keyids)) for r, s in states.items()} == {
        "root": (2, 1, 1), "targets": (2, 2, 2), "snapshot": (2, 1, 1), "timestamp": (2, 1, 1),
    }  # fmt: skip
    assert states["root"].here == ()
    assert set(states["targets"].here) == set(states["targets"].keyids)
    assert states["timestamp"].expires is not None and states["timestamp"].expires < now() + timedelta(days=2)


def test_export_root_writes_the_current_root(site, tmp_path):
    rotate_keys(site.out, site.keys, "targets")
    export_root(site.out, tmp_path / "pin" / "root.json")
    assert (tmp_path / "pin" / "root.json").read_bytes() == (site.meta / "2.root.json").read_bytes()
    assert trusted_root(site.out) == (site.meta / "2.root.json").read_bytes()
    # A node enrolled now pins v2 and needs no chain.
    assert site.read("late-node", root=trusted_root(site.out)).serial == 2


# --------------------------------------------------------------------------- signed targets a reader refuses


def _retarget(path: str, **custom: Any) -> Callable[[Targets], None]:
    """Move or change the custom field of releases/2.1.0/tgpro-base_2.1.0.tar.gz."""

    def mutate(targets: Targets) -> None:
        info = targets.targets.pop("releases/2.1.0/tgpro-base_2.1.0.tar.gz")
        fields = dict(info.custom["tgp"]) | custom
        targets.targets[path] = TargetFile(info.length, info.hashes, path, {"custom": {"tgp": fields}})

    return mutate


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (_retarget("releases/2.1.0/../../../etc/passwd"), "must be 'releases/2.1.0/tgpro-base_2.1.0.tar.gz'"),
        (_retarget("pool/tgpro-base_2.1.0.tar.gz"), "must be"),
        (_retarget("releases/2.1.0/tgpro-base_2.1.0.tar.gz", package="../evil"), "invalid package name"),
        (_retarget("releases/2.1.0/tgpro-base_2.1.0.tar.gz", channel="nightly"), "unknown channel"),
        (_retarget("releases/2.1.0/tgpro-base_2.1.0.tar.gz", needs_reboot="yes"), "'needs_reboot' must be bool"),
        (_retarget("releases/2.1.0/tgpro-base_2.1.0.tar.gz", notes="other"), "disagree on the release's metadata"),
        (_retarget("releases/latest/tgpro-base_2.1.0.tar.gz", release="latest"), "invalid version"),
        (lambda t: t.targets["releases/2.1.0/tgpro-base_2.1.0.tar.gz"].unrecognized_fields.clear(), "no 'tgp'"),
        # The hash becomes part of the package's URL: only 64 lowercase hex digits.
        (
            lambda t: t.targets["releases/2.1.0/tgpro-base_2.1.0.tar.gz"].hashes.update(sha256="../" * 21 + "x"),
            "no sha256",
        ),
        (lambda t: t.targets["releases/2.1.0/tgpro-base_2.1.0.tar.gz"].hashes.update(sha256="A" * 64), "no sha256"),
    ],
)
def test_signed_targets_that_do_not_describe_releases_are_refused(site, mutate, why):
    targets = Store(site.out, site.keys).targets().signed
    mutate(targets)
    with pytest.raises(IndexFormatError, match=why):
        index_from_targets(targets)


def test_a_reader_refuses_a_hostile_target_path_even_when_properly_signed(site):
    publish_by_hand(site, sorted(site.key_files("targets")), _retarget("releases/2.1.0/../../x_2.1.0.tar.gz"))
    with pytest.raises(IndexFormatError, match="must be"):
        site.read()


# --------------------------------------------------------------------------- offline checks (install)


def test_two_refreshes_of_one_metadata_directory_take_turns(site, monkeypatch):
    # ngclient is made for one instance per metadata directory at a time: a control
    # worker's two processes, or a firing beside sync_releases, refresh one after the
    # other. (The timing is instrumented around ngclient's own refresh.)
    from tuf.ngclient import Updater

    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    real = Updater.refresh

    def timed(self: Updater) -> None:
        began = time.monotonic()
        real(self)
        time.sleep(0.2)  # long enough for the other thread to come in if nothing held it
        spans.append((began, time.monotonic()))

    def read() -> None:
        try:
            site.read()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    monkeypatch.setattr(Updater, "refresh", timed)
    threads = [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and len(spans) == 2, errors
    first, second = sorted(spans)
    assert first[1] <= second[0], f"the refreshes overlapped: {spans}"


def test_last_verified_index_is_what_the_reader_verified_checked_again_offline(site):
    online = site.read()
    shutil.rmtree(site.out)  # no network, no repository: install needs neither
    assert last_verified_index(site.reader_dir("node")) == online


def test_last_verified_index_refuses_expired_targets(site):
    site.read()
    with pytest.raises(MetadataExpired, match="expired"):
        last_verified_index(site.reader_dir("node"), now=now() + timedelta(days=400))


def test_last_verified_index_refuses_targets_changed_on_disk(site):
    site.read()
    md = site.reader_dir("node")
    data = json.loads((md / "targets.json").read_bytes())
    data["signed"]["targets"]["releases/2.1.0/tgpro-base_2.1.0.tar.gz"]["length"] += 1
    (md / "targets.json").write_text(json.dumps(data))
    with pytest.raises(MetadataRefused, match="fails its check"):
        last_verified_index(md)


def test_last_verified_index_without_a_download_first_is_refused_saying_so(site):
    site.read()
    (site.reader_dir("node") / "targets.json").unlink()  # e.g. a state directory restored from backup
    with pytest.raises(MetadataRefused, match="download first"):
        last_verified_index(site.reader_dir("node"))
    with pytest.raises(MetadataRefused, match="download first"):
        last_verified_index(site.reader_dir("never-downloaded"))


def test_verify_package_accepts_the_signed_bytes_only(site, tmp_path):
    entry = next(p for p in site.read().release("2.1.0").packages if p.name == "tgpro-base")
    path = tmp_path / "tgpro-base_2.1.0.tar.gz"
    good = httpx.get(package_url(site.url, entry), timeout=5).content
    path.write_bytes(good)
    verify_package(entry, path)
    for bad in (good[:-1], good + b"x", bytes([good[0] ^ 1]) + good[1:]):
        path.write_bytes(bad)
        with pytest.raises(PackageVerificationError, match="does not match its signed target info"):
            verify_package(entry, path)


def test_threads_that_start_downloading_at_once_load_the_ca_bundle_once(monkeypatch):
    from agent.shared import repository

    built = []
    real = httpx.create_ssl_context

    def slow_build(*args, **kwargs):  # as slow as on a loaded machine, so that the threads overlap
        built.append(1)
        threading.Event().wait(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(repository, "_tls", None)
    monkeypatch.setattr(httpx, "create_ssl_context", slow_build)
    clients = []
    threads = [threading.Thread(target=lambda: clients.append(repository.repo_client(5))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(clients) == 8 and len(built) == 1
    for client in clients:
        client.close()


# --------------------------------------------------------------------------- build_repo


@pytest.fixture
def repo_settings(settings, tmp_path):
    settings.TGP_REPO_DIR = tmp_path / "out"
    settings.TGP_REPO_KEYS_DIR = tmp_path / "keys"
    settings.TGP_REPO_ROOT_FILE = tmp_path / "pin" / "repo-root.json"
    settings.TGP_REPO_METADATA_DIR = tmp_path / "tuf"
    return settings


def test_build_repo_publishes_and_pins_the_root_when_there_is_none(repo_settings, tmp_path):
    out = run_cli("build_repo", tmp_path / "src", tmp_path / "out", "--demo")
    assert "targets version 1, 3 releases" in out and f"Pinned the repository's root in {tmp_path / 'pin'}" in out
    pin = repo_settings.TGP_REPO_ROOT_FILE
    assert pin.read_bytes() == trusted_root(tmp_path / "out")
    assert {p.name.split("-")[0] for p in (tmp_path / "keys").iterdir()} == {"root", "targets", "snapshot", "timestamp"}
    rotate_keys(tmp_path / "out", tmp_path / "keys", "targets")
    pinned = pin.read_bytes()
    again = run_cli("build_repo", tmp_path / "src", tmp_path / "out")
    assert "targets version 3" in again and "Pinned" not in again
    assert pin.read_bytes() == pinned  # the pin stays: nodes follow the root chain from it


def test_build_repo_takes_keys_dir_and_pin_root_options(repo_settings, tmp_path):
    add_release(tmp_path / "src", "stable", "2.1.0")
    run_cli("build_repo", tmp_path / "src", tmp_path / "out", "--keys-dir", tmp_path / "usb", "--pin-root",
            tmp_path / "node-root.json")  # fmt: skip
    assert len(list((tmp_path / "usb").glob("*.key"))) == 4 and not (tmp_path / "keys").exists()
    assert (tmp_path / "node-root.json").read_bytes() == trusted_root(tmp_path / "out")
    assert not repo_settings.TGP_REPO_ROOT_FILE.exists()


def test_build_repo_on_a_broken_source_is_a_command_error_naming_it_and_writes_nothing(repo_settings, tmp_path):
    bad = add_release(tmp_path / "src", "stable", "2.1.0") / "Evil_1.0.tar.gz"
    bad.write_bytes(b"x")
    with pytest.raises(CommandError, match=re.escape(f"{bad}: invalid package name 'Evil'")):
        run_cli("build_repo", tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "keys").exists()
    assert not repo_settings.TGP_REPO_ROOT_FILE.exists()


def test_build_repo_without_the_targets_key_is_a_command_error(repo_settings, tmp_path):
    add_release(tmp_path / "src", "stable", "2.1.0")
    run_cli("build_repo", tmp_path / "src", tmp_path / "out")
    for key in (tmp_path / "keys").glob("targets-*.key"):
        key.rename(tmp_path / key.name)
    before = tree(tmp_path / "out")
    refused = f"the targets role needs 1 of its keys to sign, 0 found in {tmp_path / 'keys'}"
    with pytest.raises(CommandError, match=re.escape(refused)):
        run_cli("build_repo", tmp_path / "src", tmp_path / "out")
    assert tree(tmp_path / "out") == before


# --------------------------------------------------------------------------- repo_keys


def _repo_keys(site: Site, *args: Any) -> str:
    return run_cli("repo_keys", "--repo", site.out, "--keys-dir", site.keys, *args)


def test_repo_keys_show_lists_roles_versions_thresholds_and_keys_here(site, tmp_path):
    (key,) = site.key_files("targets")
    key.rename(tmp_path / key.name)
    out = _repo_keys(site, "show")
    keyid = key.name.removeprefix("targets-").removesuffix(".key")
    roles = [line.split()[0] for line in out.splitlines() if " version " in line]
    assert roles == ["root", "targets", "snapshot", "timestamp"]
    assert "targets   version 1" in out and "threshold 1 of 1 key(s), 0 here" in out
    assert f"    {keyid} (not here)" in out
    assert out.count("(here)") == 3


def test_repo_keys_show_defaults_to_the_configured_repository(site, settings):
    settings.TGP_REPO_DIR, settings.TGP_REPO_KEYS_DIR = site.out, site.keys
    assert run_cli("repo_keys", "show").count("(here)") == 4


def test_repo_keys_rotate_makes_a_new_root_version_readers_follow(site):
    site.read()
    out = _repo_keys(site, "rotate", "targets", "--count", 2, "--threshold", 2)
    assert "root version 2: targets has 2 key(s), threshold 2" in out
    assert site.read().serial == 2 and site.seen("node", "root") == 2


def test_repo_keys_resign_signs_again_only_when_due_unless_forced(site):
    assert _repo_keys(site, "resign").strip() == "nothing to sign again yet"
    assert _repo_keys(site, "resign", "--force").strip() == "signed again: snapshot, timestamp"
    assert site.read().serial == 1 and site.seen("node", "timestamp") == 2


def test_repo_keys_export_root_writes_the_root_to_pin(site, tmp_path):
    _repo_keys(site, "rotate", "root")
    assert "root written to" in _repo_keys(site, "export-root", tmp_path / "node" / "root.json")
    assert (tmp_path / "node" / "root.json").read_bytes() == (site.meta / "2.root.json").read_bytes()


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (("rotate", "mirror"), "invalid choice: 'mirror'"),
        (("rotate", "targets", "--count", "0"), "--count: must be at least 1, got 0"),
        (("rotate", "targets", "--count", "two"), "'two' is not a whole number"),
        (("rotate", "targets", "--threshold", "0"), "--threshold: must be at least 1"),
        (("rotate", "targets", "--threshold", "2"), "a threshold of 2 cannot be met"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        ((), "required: action"),
    ],
)
def test_repo_keys_bad_arguments_are_clear_errors_and_change_nothing(site, args, why):
    before = tree(site.out, site.keys)
    with pytest.raises(CommandError, match=why):
        _repo_keys(site, *args)
    assert tree(site.out, site.keys) == before


@pytest.mark.parametrize("action", [("show",), ("resign",), ("rotate", "targets"), ("export-root", "pin.json")])
def test_repo_keys_on_a_directory_that_is_no_repository_says_so(tmp_path, action):
    with pytest.raises(CommandError, match="not a repository yet|nothing published yet"):
        run_cli("repo_keys", "--repo", tmp_path / "nothing", "--keys-dir", tmp_path / "keys", *action)
    assert not (tmp_path / "keys").exists() and not (tmp_path / "pin.json").exists()


# --------------------------------------------------------------------------- sync_releases


@pytest.fixture
def synced(site, settings, tmp_path):
    settings.TGP_REPO_URL = site.url
    settings.TGP_REPO_ROOT_FILE = tmp_path / "pin" / "repo-root.json"
    settings.TGP_REPO_METADATA_DIR = tmp_path / "tuf"
    export_root(site.out, settings.TGP_REPO_ROOT_FILE)
    return site


@pytest.mark.django_db
def test_sync_releases_imports_the_releases_through_tuf(synced):
    from updates.models import Release

    assert "targets version 1: 4 release(s) imported" in run_cli("sync_releases")
    rows = {r.version: r for r in Release.objects.prefetch_related("packages")}
    assert set(rows) == {"2.0.0", "2.1.0", "2.2.0", "2.2.1"}
    for channel, version, needs_reboot, hotfix, notes, packages in DEMO_RELEASES:
        row = rows[version]
        assert (row.channel, row.needs_reboot, row.hotfix, row.notes, row.index_serial) == (
            channel, needs_reboot, hotfix, notes, 1,
        )  # fmt: skip
        assert {p.name: p.version for p in row.packages.all()} == packages
        assert all(p.file.startswith(f"releases/{version}/") and len(p.sha256) == 64 for p in row.packages.all())
    assert (rows["2.2.1"].hotfix, rows["2.2.1"].needs_reboot) == (True, False)
    assert not any(r.withdrawn_at for r in rows.values())


@pytest.mark.django_db
def test_sync_releases_marks_a_release_removed_from_the_source_withdrawn(synced):
    from updates.models import Release

    run_cli("sync_releases")
    shutil.rmtree(synced.source / "stable" / "2.2.0")
    synced.publish()
    assert "targets version 2: 3 release(s) imported" in run_cli("sync_releases")
    assert Release.objects.get(version="2.2.0").withdrawn_at is not None
    listed = Release.objects.filter(withdrawn_at=None).order_by("version").values_list("version", "index_serial")
    assert list(listed) == [("2.0.0", 2), ("2.1.0", 2), ("2.2.1", 2)]


@pytest.mark.django_db
def test_sync_releases_follows_a_key_rotation_from_the_pinned_root(synced):
    from updates.models import Release

    rotate_keys(synced.out, synced.keys, "targets")
    assert "targets version 2" in run_cli("sync_releases")
    assert Release.objects.count() == 4


@pytest.mark.django_db
def test_sync_releases_refuses_another_repositorys_root_and_imports_nothing(synced, settings, tmp_path):
    from updates.models import Release

    add_release(tmp_path / "other-src", "stable", "9.0")
    build_repository(tmp_path / "other-src", tmp_path / "other", tmp_path / "other-keys")
    export_root(tmp_path / "other", settings.TGP_REPO_ROOT_FILE)
    with pytest.raises(CommandError, match="releases not imported: repository metadata refused"):
        run_cli("sync_releases")
    assert Release.objects.count() == 0


@pytest.mark.django_db
def test_sync_releases_without_a_pinned_root_names_the_setting(synced, settings):
    from updates.models import Release

    settings.TGP_REPO_ROOT_FILE.unlink()
    with pytest.raises(CommandError, match="no pinned repository root: TGP_REPO_ROOT_FILE"):
        run_cli("sync_releases")
    assert Release.objects.count() == 0
