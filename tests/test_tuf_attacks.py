"""The attacks of TUF's threat list that apply to the update repository, each against a
node's real download (and install) step, in-process, on a real HTTP server on loopback.

Every attack must end the same way: an error whose message names the cause, nothing
installed, nobody logged off, and no package accepted into the download directory.
The first test is the control case: the same path with an honest repository installs.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from agent import steps
from agent.drivers.simulated import SimulatedDriver
from agent.shared import signing
from agent.shared.errors import DownloadError
from agent.shared.protocol import StepCommand
from agent.shared.repository import (
    FetchError,
    MetadataExpired,
    MetadataRefused,
    PackageVerificationError,
    ReleaseWithdrawn,
    RepositoryIndex,
    repo_client,
    trusted_index,
)
from tests.conftest import Repo
from tests.servers import Heads, RepoServer, _RepoHandler, body, endless, gzip_bomb, measured
from updates.demo import DEMO_RELEASES, build_demo_package
from updates.repository import Store, key_file, rotate_keys

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
INSTALLED, WANTED = "2.1.0", "2.2.0"  # the node runs 2.1.0 and is asked to download 2.2.0
WANTED_DIR = "stable/2.2.0"  # where 2.2.0 is in the repository's source tree
_JSON = JSONSerializer(compact=False)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


# --------------------------------------------------------------------------- a hostile server

Route = Callable[["_HostileHandler"], None]


class _HostileHandler(Heads, _RepoHandler):
    """Serves the repository directory, except the paths the test gave a route of its
    own; every response's Date header is off by the server's date_offset (seconds)."""

    def do_GET(self) -> None:
        server: Any = self.server
        if server.on_request is not None:
            server.on_request(self.path)
        route = server.routes.get(self.path)
        if route is None:
            super().do_GET()
            return
        server.behaviour.requests.append({"path": self.path, "range": self.headers.get("Range")})
        try:
            route(self)
        except OSError:
            self.close_connection = True

    def date_time_string(self, timestamp: float | None = None) -> str:
        when = time.time() if timestamp is None else timestamp
        return super().date_time_string(when + self.server.date_offset)  # type: ignore[attr-defined]


class HostileRepoServer(RepoServer):
    def __init__(self, directory: Path, *, date_offset: float = 0.0) -> None:
        super().__init__(directory)
        httpd: Any = self.httpd
        httpd.RequestHandlerClass = lambda *a, **kw: _HostileHandler(*a, directory=str(directory), **kw)
        httpd.handle_error = lambda *a: None  # clients hanging up on hostile answers is the point
        httpd.routes = self.routes = {}
        httpd.date_offset = date_offset
        httpd.on_request = None
        httpd.stop = self.stop = threading.Event()  # ends the slow routes at teardown
        httpd.hung_up = self.hung_up = threading.Event()  # the endless route saw the client go
        httpd.sent = 0

    @property
    def sent(self) -> int:
        return self.httpd.sent  # type: ignore[attr-defined]

    def on_request(self, hook: Callable[[str], None] | None) -> None:
        self.httpd.on_request = hook  # type: ignore[attr-defined]

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        super().__exit__(*exc)


def trickle(path: Path, every: float) -> Route:
    """The real file, with its true length, one byte every `every` seconds."""

    def route(h: _HostileHandler) -> None:
        server: Any = h.server
        data = path.read_bytes()
        h.head(200, Content_Length=len(data))
        for i in range(len(data)):
            h.wfile.write(data[i : i + 1])
            h.wfile.flush()
            if server.stop.wait(every):
                return

    return route


# --------------------------------------------------------------------------- the node


@dataclass
class Node:
    """A simulated appliance running 2.1.0 with alice logged on, and its agent's steps."""

    driver: SimulatedDriver
    reports: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def report(self, event: str, **kw: Any) -> None:
        self.reports.append((event, kw))

    def command(self, version: str) -> StepCommand:
        return StepCommand(run=41, node=self.driver.hostname, version=version)

    def download(self, version: str = WANTED) -> None:
        steps.download(self.driver, self.command(version), self.report)

    def install(self, version: str = WANTED) -> None:
        steps.install(self.driver, self.command(version), self.report)

    def refresh(self) -> RepositoryIndex:
        """What every step does first: the node's TUF refresh against the repository."""
        with repo_client(5) as client:
            return steps.refreshed(client, self.driver)

    def accepted(self, version: str = WANTED) -> list[str]:
        """The package files accepted into the download directory (not the .part files)."""
        return sorted(p.name for p in self.driver.download_dir(version).glob("*.tar.gz"))

    def assert_untouched(self, version: str = WANTED) -> None:
        """Nothing installed, nobody logged off, no package accepted, no success reported."""
        snap = self.driver.snapshot()
        assert snap["installed_version"] == INSTALLED
        assert snap["packages"] == _packages(INSTALLED)
        assert snap["users"] == ["alice"], "nobody may be logged off"
        assert snap["logon_enabled"] and not snap["maintenance"]
        assert not (self.driver.state_dir / "releases" / f"41-{version}").exists()
        assert self.accepted(version) == []
        assert [event for event, _ in self.reports if event == "succeeded"] == []


def _packages(version: str) -> dict[str, str]:
    return next(p for _, v, *_, p in DEMO_RELEASES if v == version)


@pytest.fixture
def make_node(tmp_path: Path) -> Callable[[str], Node]:
    def make(name: str = "gw-attacked") -> Node:
        driver = SimulatedDriver(name, tmp_path / "nodes" / name)
        driver.seed(version=INSTALLED, packages=_packages(INSTALLED), users=["alice"], cluster=False)
        return Node(driver)

    return make


@pytest.fixture
def node(make_node: Callable[[str], Node]) -> Node:
    return make_node("gw-attacked")


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path / "repo", package_bytes=16 * 1024)


@pytest.fixture
def serve(agent_settings: Callable[..., Any]) -> Iterator[Callable[..., HostileRepoServer]]:
    """serve(repo, date_offset=...): the repository on loopback, the node's agent pointed
    at it, pinning the root the repository was built with (version 1)."""
    servers: list[HostileRepoServer] = []

    def start(repo: Repo, **kw: Any) -> HostileRepoServer:
        server = HostileRepoServer(repo.dir, **kw).__enter__()
        servers.append(server)
        agent_settings(repo_url=server.url, repo_root_file=repo.root_file, download_timeout=5.0)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


# --------------------------------------------------------------------------- forging metadata


def _meta(version: int, data: bytes) -> MetaFile:
    return MetaFile(version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()})


def _signer(path: Path) -> CryptoSigner:
    private = signing.load_private(path)
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))


def role_signers(repo: Repo, role: str) -> list[CryptoSigner]:
    """The keys the current root trusts for role (all of them are in the keys directory)."""
    root = Store(repo.dir, repo.keys).root().signed
    return [_signer(key_file(repo.keys, role, keyid)) for keyid in sorted(root.roles[role].keyids)]


def forge_online(repo: Repo, *, targets: MetaFile | None = None, snapshot: MetaFile | None = None) -> None:
    """New snapshot (listing `targets` if given) and timestamp versions, signed with the
    repository's valid online keys; with `snapshot`, only a timestamp listing it. So the
    online roles are right, and only what the test forged elsewhere is wrong."""
    store = Store(repo.dir, repo.keys)
    root = store.root().signed
    old_ts, old_snapshot = store.timestamp(), store.snapshot()
    assert old_ts is not None and old_snapshot is not None
    if snapshot is None:
        meta = dict(old_snapshot.signed.meta)
        if targets is not None:
            meta["targets.json"] = targets
        new = Snapshot(version=old_snapshot.signed.version + 1, expires=_now() + timedelta(days=7), meta=meta)
        data = store.sign(Metadata(new), root, Snapshot.type)
        store.write(f"{new.version}.snapshot.json", data)
        snapshot = _meta(new.version, data)
    ts = Timestamp(version=old_ts.signed.version + 1, expires=_now() + timedelta(days=1), snapshot_meta=snapshot)
    store.write("timestamp.json", store.sign(Metadata(ts), root, Timestamp.type))


def evil_targets(repo: Repo) -> Targets:
    """The next targets version, in which 2.2.0's tgpro-browser is the attacker's package
    (its file served under the hash-prefixed name the metadata points to)."""
    current = Store(repo.dir, repo.keys).targets()
    assert current is not None
    targets = dict(current.signed.targets)
    path = f"releases/{WANTED}/tgpro-browser_2.2.0.tar.gz"
    evil = build_demo_package("tgpro-browser", "6.6.6", package_bytes=4096)
    sha256 = hashlib.sha256(evil).hexdigest()
    (repo.dir / "targets" / "releases" / WANTED / f"{sha256}.tgpro-browser_2.2.0.tar.gz").write_bytes(evil)
    targets[path] = TargetFile(
        length=len(evil), hashes={"sha256": sha256}, path=path,
        unrecognized_fields=dict(targets[path].unrecognized_fields),
    )  # fmt: skip
    return Targets(version=current.signed.version + 1, expires=_now() + timedelta(days=365), targets=targets)


def signed_by(targets: Targets, signers: list[CryptoSigner]) -> Metadata[Targets]:
    md = Metadata(targets)
    for signer in signers:
        md.sign(signer, append=True)
    return md


def publish_forged(repo: Repo, md: Metadata[Targets]) -> None:
    data = md.to_bytes(_JSON)
    Store(repo.dir, repo.keys).write(f"{md.signed.version}.targets.json", data)
    forge_online(repo, targets=_meta(md.signed.version, data))


def root_version(repo: Repo, version: int) -> Root:
    return Metadata[Root].from_file(str(repo.dir / "metadata" / f"{version}.root.json")).signed


# --------------------------------------------------------------------------- the control case


def test_an_honest_repository_downloads_and_installs_through_the_same_path(repo, serve, node):
    serve(repo)
    node.download()
    assert node.accepted() == sorted(f"{n}_{v}.tar.gz" for n, v in _packages(WANTED).items())
    node.install()
    snap = node.driver.snapshot()
    assert snap["installed_version"] == WANTED and snap["packages"] == _packages(WANTED)
    assert [event for event, _ in node.reports] == ["succeeded", "succeeded"]


# --------------------------------------------------------------------------- arbitrary package


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        (lambda data: bytes([data[0] ^ 0xFF]) + data[1:], "sha256 does not match its signed target info"),
        (lambda data: data + b"#!/bin/sh\nrm -rf /\n", "larger than listed"),
    ],
    ids=["same-length-other-bytes", "longer-file"],
)
def test_a_package_replaced_on_the_server_is_refused_and_nothing_is_installed(repo, serve, node, tamper, why):
    # The first package the node fetches for 2.2.0 (they come in name order).
    (victim,) = (repo.dir / "targets" / "releases" / WANTED).glob("*.tgpro-base_2.1.0.tar.gz")
    victim.write_bytes(tamper(victim.read_bytes()))
    serve(repo)
    with pytest.raises(PackageVerificationError, match=f"tgpro-base_2.1.0.tar.gz.*{why}") as refused:
        node.download()
    assert not isinstance(refused.value, DownloadError), "bad bytes are refused for good, not retried"
    # The install step checks again, and fetches what is missing: the same bad bytes.
    with pytest.raises(PackageVerificationError, match=why):
        node.install()
    node.assert_untouched()
    assert not list(node.driver.download_dir(WANTED).glob("*.part")), "refused bytes are not kept"


# --------------------------------------------------------------------------- rollback


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_metadata_rolled_back_to_a_lower_version_is_refused_naming_the_role(repo, serve, node, role):
    meta = repo.dir / "metadata"
    old_timestamp = (meta / "timestamp.json").read_bytes()
    repo.publish()  # targets, snapshot and timestamp version 2
    serve(repo)
    assert node.refresh().serial == 2  # the node has seen version 2 of each
    if role == "timestamp":
        # The server replays the timestamp of version 1 (validly signed, not expired).
        (meta / "timestamp.json").write_bytes(old_timestamp)
    elif role == "snapshot":
        # A new timestamp, signed with the right key, that lists snapshot version 1.
        forge_online(repo, snapshot=_meta(1, (meta / "1.snapshot.json").read_bytes()))
    else:
        # New snapshot and timestamp, signed with the right keys, that list targets version 1.
        forge_online(repo, targets=_meta(1, (meta / "1.targets.json").read_bytes()))
    with pytest.raises(MetadataRefused, match=rf"rollback: a lower or unexpected metadata version: .*{role}") as e:
        node.download()
    assert not isinstance(e.value, DownloadError), "refused metadata is not retried"
    node.assert_untouched()


# --------------------------------------------------------------------------- indefinite freeze


def test_a_frozen_repository_whose_timestamp_expired_is_refused_and_retried_later(tmp_path, serve, node):
    # Nobody re-signed the timestamp since three days ago (it holds one day).
    repo = Repo(tmp_path / "repo", package_bytes=16 * 1024, now=_now() - timedelta(days=3))
    serve(repo)
    with pytest.raises(MetadataExpired, match=r"timestamp\.json is expired.*not being re-signed") as e:
        node.download()
    # A freeze may heal (the beat signs again): the agent retries it like a network error.
    assert isinstance(e.value, DownloadError) and isinstance(e.value, FetchError)
    assert "clock" not in str(e.value)
    node.assert_untouched()


def test_expired_metadata_with_the_servers_clock_far_off_names_clock_trouble(tmp_path, serve, node):
    # The timestamp expired an hour ago by this machine's clock, which is two hours ahead
    # of the repository server's: at the server's time it is still valid.
    repo = Repo(tmp_path / "repo", package_bytes=16 * 1024, now=_now() - timedelta(days=1, hours=1))
    serve(repo, date_offset=-2 * 3600)
    with pytest.raises(MetadataExpired, match=r"timestamp\.json is expired.*clock trouble.*120 min ahead of") as e:
        node.download()
    assert isinstance(e.value, DownloadError)
    node.assert_untouched()


# --------------------------------------------------------------------------- endless data, gzip bombs


BOMB_MIB = 1024


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = gzip_bomb(BOMB_MIB)  # 1 GiB inflated
    assert len(data) < 1.2 * MiB
    return data


@pytest.mark.parametrize(
    ("path", "hostile", "why"),
    [
        ("timestamp.json", "endless", r"timestamp\.json: more than 16384 bytes"),
        ("1.snapshot.json", "endless", r"1\.snapshot\.json: more than \d+ bytes"),
        ("timestamp.json", "bomb", r"timestamp\.json: Content-Encoding gzip refused"),
        ("1.targets.json", "bomb", r"1\.targets\.json: Content-Encoding gzip refused"),
    ],
)
def test_endless_metadata_and_gzip_bombs_cost_bounded_memory_and_install_nothing(
    repo, serve, node, bomb, path, hostile, why
):
    server = serve(repo)
    server.routes[f"/metadata/{path}"] = endless if hostile == "endless" else body(bomb, Content_Encoding="gzip")
    result, peak = measured(node.download)
    assert isinstance(result, FetchError), result
    assert "repository metadata not fetched" in str(result) and re.search(why, str(result)), result
    # The cap (16 KiB for the timestamp, the listed length for the others), one network
    # read of 1 MiB beyond it and HTTP buffers: a few MiB, not the 256 MiB or 1 GiB on offer.
    assert peak < 8 * MiB, f"{peak / MiB:.1f} MiB"
    if hostile == "endless":
        assert server.hung_up.wait(5), "the node should hang up, not drain the rest"
        assert server.sent < 64 * MiB
    node.assert_untouched()


# --------------------------------------------------------------------------- mix-and-match


@pytest.mark.parametrize("role", ["snapshot", "targets"])
def test_metadata_of_two_versions_mixed_is_refused_as_mix_and_match(repo, serve, node, role):
    repo.publish()  # version 2 of targets and snapshot; the timestamp lists snapshot 2, which lists targets 2
    meta = repo.dir / "metadata"
    # Under the name the newer metadata lists, the file of the older version (validly signed).
    (meta / f"2.{role}.json").write_bytes((meta / f"1.{role}.json").read_bytes())
    serve(repo)
    with pytest.raises(MetadataRefused, match=r"mix-and-match: a file does not match the length or hash") as e:
        node.download()
    # Which file did not match: the operator must be able to tell without a debugger.
    assert f"2.{role}.json" in str(e.value), f"the message does not name the {role} file: {e.value}"
    node.assert_untouched()


# --------------------------------------------------------------------------- slow retrieval


@pytest.mark.parametrize("path", ["timestamp.json", "1.targets.json"])
def test_a_server_trickling_metadata_fails_within_the_deadline(repo, serve, path, tmp_path):
    server = serve(repo)
    server.routes[f"/metadata/{path}"] = trickle(repo.dir / "metadata" / path, every=0.1)
    start = time.monotonic()
    with repo_client(30) as client, pytest.raises(FetchError, match=r"not complete within the deadline of 2 s"):
        trusted_index(tmp_path / "tuf", server.url, repo.root_file.read_bytes(), client=client, deadline=2)
    assert time.monotonic() - start < 2 + 1.5


def test_a_download_step_against_a_trickling_server_ends_in_bounded_time_and_installs_nothing(
    repo, serve, node, monkeypatch
):
    # The step's own refresh, with its deadline brought down from 120 s for the test.
    monkeypatch.setitem(trusted_index.__kwdefaults__, "deadline", 2.0)
    server = serve(repo)
    server.routes["/metadata/timestamp.json"] = trickle(repo.dir / "metadata" / "timestamp.json", every=0.1)
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"timestamp\.json: not complete within the deadline of 2 s") as e:
        node.download()
    assert time.monotonic() - start < 2 + 1.5
    assert isinstance(e.value, DownloadError)  # retried: the server may be slow, not hostile
    node.assert_untouched()


# --------------------------------------------------------------------------- compromised keys


def test_targets_signed_with_a_compromised_key_after_its_rotation_are_refused(repo, serve, make_node, tmp_path):
    serve(repo)
    seen_before = make_node("gw-before")
    assert seen_before.refresh().serial == 1  # trusts root 1 and its targets key
    (old_key,) = repo.keys.glob("targets-*.key")
    stolen = tmp_path / "stolen.key"
    shutil.copy(old_key, stolen)

    rotate_keys(repo.dir, repo.keys, "targets")  # root 2: the stolen key is out
    # The attacker publishes targets with their package, signed with the stolen key, and
    # snapshot and timestamp signed with the valid online keys: only that signature is wrong.
    forged = signed_by(evil_targets(repo), [_signer(stolen)])
    root_version(repo, 1).verify_delegate(Targets.type, forged.signed_bytes, forged.signatures)  # valid once
    with pytest.raises(UnsignedMetadataError):
        root_version(repo, 2).verify_delegate(Targets.type, forged.signed_bytes, forged.signatures)
    publish_forged(repo, forged)

    # A node that never saw root 2 (it pinned root 1) walks to it before trusting targets.
    for node in (seen_before, make_node("gw-fresh")):
        with pytest.raises(MetadataRefused, match=r"not signed by enough trusted keys.*targets was signed by 0/1"):
            node.download()
        node.assert_untouched()
        pinned = repo.root_file.read_bytes()
        assert (steps.metadata_dir(node.driver, pinned) / "root_history" / "2.root.json").is_file()


def test_targets_signed_by_one_of_two_required_keys_and_a_wrong_one_are_refused(repo, serve, node):
    rotate_keys(repo.dir, repo.keys, "targets", count=2, threshold=2)  # root 2: two keys, both needed
    serve(repo)
    assert node.refresh().serial == 2  # the targets the two keys signed are fine
    valid = role_signers(repo, Targets.type)
    assert len(valid) == 2
    intruder = CryptoSigner.generate_ed25519()  # a key root 2 does not list
    forged = signed_by(evil_targets(repo), [valid[0], intruder])
    both = signed_by(forged.signed, valid)
    root_version(repo, 2).verify_delegate(Targets.type, both.signed_bytes, both.signatures)  # all but one signature
    publish_forged(repo, forged)

    with pytest.raises(MetadataRefused, match=r"not signed by enough trusted keys \(threshold\).*signed by 1/2"):
        node.download()
    node.assert_untouched()


# --------------------------------------------------------------------------- withdrawn release


def _withdraw(repo: Repo) -> None:
    shutil.rmtree(repo.root / "src" / WANTED_DIR)
    repo.publish()


def test_a_withdrawn_release_is_not_downloaded(repo, serve, node):
    _withdraw(repo)
    serve(repo)
    with pytest.raises(ReleaseWithdrawn, match=rf"release {WANTED} was withdrawn.*targets \(version 2\)") as e:
        node.download()
    assert not isinstance(e.value, DownloadError), "a withdrawn release is not retried"
    node.assert_untouched()


def test_a_release_withdrawn_while_its_packages_download_is_refused_before_anyone_is_logged_off(repo, serve, node):
    server = serve(repo)
    withdrawn = threading.Event()

    def withdraw_at_first_package(path: str) -> None:
        if path.startswith(f"/targets/releases/{WANTED}/") and not withdrawn.is_set():
            withdrawn.set()
            _withdraw(repo)  # the files stay (never rewritten); the signed targets no longer list them

    server.on_request(withdraw_at_first_package)
    with pytest.raises(ReleaseWithdrawn, match=rf"release {WANTED} was withdrawn.*targets \(version 2\)"):
        node.download()
    assert withdrawn.is_set()
    # Packages it fetched are in the download directory, but the step failed: no drain,
    # no install follows, and the install step itself refuses it too.
    with pytest.raises(ReleaseWithdrawn):
        node.install()
    snap = node.driver.snapshot()
    assert snap["installed_version"] == INSTALLED and snap["users"] == ["alice"] and snap["logon_enabled"]
    assert [event for event, _ in node.reports if event == "succeeded"] == []


def test_a_release_withdrawn_between_download_and_install_is_not_installed(repo, serve, node):
    serve(repo)
    node.download()
    assert len(node.accepted()) == 3
    _withdraw(repo)
    assert WANTED not in [r.version for r in node.refresh().releases]  # the node's next refresh sees it
    with pytest.raises(ReleaseWithdrawn, match=rf"release {WANTED} was withdrawn.*targets \(version 2\)"):
        node.install()
    snap = node.driver.snapshot()
    assert snap["installed_version"] == INSTALLED and snap["packages"] == _packages(INSTALLED)
    assert snap["users"] == ["alice"] and snap["logon_enabled"]
    assert [event for event, _ in node.reports] == ["succeeded"]  # the download's, nothing after
