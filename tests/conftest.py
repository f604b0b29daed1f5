"""Shared fixtures: real Redis, a real control worker on the test database, a
signed repository on a loopback HTTP server, and node agents as real processes.

Redis: REDIS_URL when set (CI points it at the machine's Redis), otherwise the
embedded redis-server on a free port for this session.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.servers import RepoServer, free_port, lasting_port
from tgpadmin.processes import die_with_parent, stop_process, stop_processes, wait_for

ROOT = Path(__file__).resolve().parent.parent
_names = itertools.count(1)


@pytest.fixture(scope="session", autouse=True)
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import redis
    from django.conf import settings

    from agent import config as agent_config
    from agent.app import app as agent_app
    from tgpadmin import embedded_redis
    from tgpadmin.celery import app

    url = worker_database(os.environ.get("REDIS_URL", ""), os.environ.get("PYTEST_XDIST_WORKER", ""))
    proc = None
    if not url:
        port = free_port()
        cmd = embedded_redis.command(port, tmp_path_factory.mktemp("redis"), persist=False)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent)
        embedded_redis.wait_until_up(port)
        url = f"redis://127.0.0.1:{port}/0"
    redis.Redis.from_url(url).flushdb()
    # Django settings were loaded before this fixture ran; Celery reads them lazily
    # through django.conf.settings, so changing them there is enough.
    settings.REDIS_URL = settings.CELERY_BROKER_URL = settings.CELERY_RESULT_BACKEND = url
    app._backend_cache = None
    # The agent code that tests run in this process (reports, steps) talks to the same
    # Redis, and trusts the same control plane, whose key this process signs with too.
    agent_config.configure(replace(agent_config.config(), redis_url=url, control_pubkey=CONTROL_KEY.public))
    settings.TGP_CONTROL_SIGNING_KEY_FILE = CONTROL_KEY.path
    agent_app.conf.broker_url = url
    assert app.connection_for_write().as_uri().endswith(url.rsplit("@", 1)[-1].split("//")[-1])
    yield url
    if proc:
        stop_process(proc)


def worker_database(url: str, worker: str) -> str:
    """The Redis database of one pytest-xdist worker (gw0, gw1, ...) on a shared Redis:
    the next ones after the URL's, so that one worker's FLUSHDB, queues and slots never
    touch another's (kombu prefixes fan-out channels with the database too). Without
    xdist, or on the embedded Redis (one per worker), the URL as it is."""
    if not url or not worker.startswith("gw"):
        return url
    parts = urlsplit(url)
    index = int(parts.path.strip("/") or 0) + int(worker[2:])
    if index > 15:
        raise pytest.UsageError(f"REDIS_URL {url}: worker {worker} would need Redis database {index} (at most 15)")
    return urlunsplit(parts._replace(path=f"/{index}"))


def test_database_url() -> str:
    from django.db import connection

    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{Path(s['NAME']).resolve()}"
    auth = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


test_database_url.__test__ = False  # type: ignore[attr-defined]


@dataclass(frozen=True)
class HotfixProviders:
    """The loopback mail and phone providers of tests/test_hotfix_notices.py, which the
    session's control worker is pointed at (its environment is fixed when it starts)."""

    smtp_port: int = field(default_factory=lasting_port)  # bound by the tests much later
    phone_port: int = field(default_factory=lasting_port)
    twilio_sid: str = field(default_factory=lambda: "AC" + uuid.uuid4().hex)
    twilio_token: str = field(default_factory=lambda: "token-" + uuid.uuid4().hex)
    twilio_from: str = "+15005550006"
    worker_max_retries: int = 2

    def worker_env(self) -> dict[str, str]:
        return {
            "TGP_EMAIL_HOST": "127.0.0.1",
            "TGP_EMAIL_PORT": str(self.smtp_port),
            "TGP_EMAIL_FROM": "hotfix@tgpadmin.test",
            "TGP_HOTFIX_PHONE_GATEWAY": "twilio",
            "TGP_TWILIO_ACCOUNT_SID": self.twilio_sid,
            "TGP_TWILIO_AUTH_TOKEN": self.twilio_token,
            "TGP_TWILIO_FROM": self.twilio_from,
            "TGP_TWILIO_BASE_URL": f"http://127.0.0.1:{self.phone_port}",
            "TGP_HOTFIX_RETRY_BACKOFF": "1",
            "TGP_HOTFIX_DELIVERY_MAX_RETRIES": str(self.worker_max_retries),
        }


HOTFIX = HotfixProviders()


@dataclass(frozen=True)
class ControlKey:
    """The control plane's signing key of the test session: the control worker and this
    process sign with it, the agents pin its public key."""

    path: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tgp-control-key-")) / "control.key")

    @cached_property
    def public(self) -> str:
        from agent.shared import signing

        return signing.public_b64(signing.load_or_create_private(self.path)[0])


CONTROL_KEY = ControlKey()


def accept_key(node: Any, node_dir: Path | None = None) -> str:
    """Give the node an accepted key, as an operator would after its agent offered it:
    made in the node's state directory when it has one (its agent signs with it), else
    made for the test alone (the test plays the node). Returns the public key."""
    from agent.shared import signing
    from nodes import keys

    path = (node_dir or Path(tempfile.mkdtemp(prefix="tgp-node-key-"))) / "identity.key"
    public = signing.public_b64(signing.load_or_create_private(path)[0])
    keys.enroll_accepted(node, public, "accepted by the test fixture")
    return public


def accept_keys(nodes: list[Any]) -> None:
    """accept_key for many nodes at once: a key each, made in memory, accepted in one
    insert, with no key file and no audit row. For a large fleet whose agents never run
    (1,200 nodes: 15 s one by one)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from django.utils import timezone

    from agent.shared import signing
    from nodes.models import NodeKey

    now, keys = timezone.now(), []
    for node in nodes:
        public = signing.public_b64(Ed25519PrivateKey.generate())
        keys.append(
            NodeKey(node=node, public_key=public, fingerprint=signing.fingerprint(public),
                    state=NodeKey.State.ACCEPTED, decided_at=now, note="accepted by the test fixture")
        )  # fmt: skip
    NodeKey.objects.bulk_create(keys)


def process_env(redis_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "DJANGO_SECRET_KEY": "tests-only-secret-key-" + "x" * 40,
        "TGP_HEARTBEAT_INTERVAL": "0.5",
        "TGP_REBOOT_TIMEOUT": "30",
        "TGP_RECONCILE_AFTER": "2",
        "TGP_RECONCILE_INTERVAL": "1",
        "TGP_PLAN_LOOK": "0.5",
        # Plans move by seconds here: a delayed node's users hear of every second.
        "TGP_PLAN_NOTICE_STEP": "1",
        "TGP_ANNOUNCED_UPDATE_INTERVAL": "1",
        "PYTHONUNBUFFERED": "1",
        "TGP_CONTROL_SIGNING_KEY_FILE": str(CONTROL_KEY.path),
        "TGP_CONTROL_PUBKEY": CONTROL_KEY.public,
        **extra,
    }


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


class ControlWorker:
    """The real control worker of the session; fault tests kill and restart it."""

    def __init__(self, redis_url: str, db_url: str, log_path: Path) -> None:
        self.redis_url, self.db_url, self.log_path = redis_url, db_url, log_path
        self.proc: subprocess.Popen[Any] | None = None
        self.heartbeats: subprocess.Popen[Any] | None = None  # manage.py heartbeats, beside it as in the Procfile
        self.name = ""

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[Any]:
        env = process_env(self.redis_url, DATABASE_URL=self.db_url, **HOTFIX.worker_env())
        with open(self.log_path, "a") as log:
            return subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip

    def start(self) -> None:
        self.name = f"control-{uuid.uuid4().hex[:6]}@tests"
        cmd = [sys.executable, "-m", "celery", "-A", "tgpadmin", "worker", "-Q", "control", "-n", self.name]
        cmd += ["-c", "2", "-E", "--without-gossip", "--without-mingle", "-l", "INFO"]
        self.proc = self._spawn(cmd)
        if self.heartbeats is None or self.heartbeats.poll() is not None:
            self.heartbeats = self._spawn([sys.executable, "manage.py", "heartbeats"])
        # The worker says so once it consumes (whichever broker it is on).
        wait_for(lambda: f"{self.name} ready." in self.log_path.read_text(), 60, "the control worker")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children), mid-work."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        for proc in (self.proc, self.heartbeats):
            if proc is not None:
                stop_process(proc)

    def settle(self, timeout: float = 30.0) -> None:
        """Wait (bounded) until the worker has nothing left of a test to do: the control
        queue empty and no task running or prefetched; tasks queued for later (a hold's
        or a phase's countdown) are revoked. Before a transactional test's flush: a late
        report written while PostgreSQL truncates the tables deadlocked with it (CI)."""
        import redis

        from agent.shared.protocol import CONTROL_QUEUE, HEARTBEATS
        from tgpadmin.broker_acl import queue_keys as lists_of
        from tgpadmin.celery import app

        if self.proc is None or self.proc.poll() is not None:
            return  # a fault test killed it: nothing of it can still write
        broker = redis.Redis.from_url(self.redis_url)
        inspect = app.control.inspect(destination=[self.name], timeout=2)

        def idle() -> bool:
            if sum(broker.llen(key) for key in (*lists_of(CONTROL_QUEUE, literal=False), HEARTBEATS)):
                return False
            busy = [*(inspect.active() or {}).values(), *(inspect.reserved() or {}).values()]
            return not any(busy)

        wait_for(idle, timeout, "the control worker to finish the test's tasks")
        later = [t["request"]["id"] for ts in (inspect.scheduled() or {}).values() for t in ts]
        if later:
            app.control.revoke(later, destination=[self.name])


_session_worker: ControlWorker | None = None


@pytest.fixture(scope="session")
def control_worker(redis_url: str, django_db_setup: Any, django_db_blocker: Any, logs_dir: Path) -> Iterator[Any]:
    """A real Celery worker on the control queue, writing to the test database."""
    global _session_worker
    with django_db_blocker.unblock():
        db_url = test_database_url()
    worker = _session_worker = ControlWorker(redis_url, db_url, logs_dir / "control.log")
    worker.start()
    yield worker
    _session_worker = None
    worker.stop()


@pytest.fixture(autouse=True)
def _control_worker_settles(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used the control worker (its agents stopped by then: fixtures
    end in reverse), before its database is flushed: see ControlWorker.settle."""
    yield
    if _session_worker is not None and "control_worker" in request.fixturenames:
        _session_worker.settle()


class Repo:
    """A TUF repository built from the demo sources (its keys in root/keys), served over
    loopback HTTP by the tests; root_file is the root a reader pins."""

    def __init__(self, root: Path, *, package_bytes: int = 64 * 1024, now: datetime | None = None):
        from updates.demo import write_demo_sources
        from updates.repository import build_repository, export_root

        self.root = root
        self.keys = root / "keys"
        write_demo_sources(root / "src", package_bytes=package_bytes)
        self.dir = root / "out"
        self.index = build_repository(root / "src", self.dir, self.keys, now=now)
        self.root_file = root / "root.json"
        export_root(self.dir, self.root_file)

    def publish(self, **kw: Any) -> Any:
        """Publish the source tree again (a new targets version); returns its releases."""
        from updates.repository import build_repository

        self.index = build_repository(self.root / "src", self.dir, self.keys, **kw)
        return self.index

    def import_releases(self) -> None:
        from updates.releases import import_index

        import_index(self.index)

    def pool_file(self, name: str, version: str) -> Path:
        """The served file of package name_version (in the one release that has it)."""
        found = sorted((self.dir / "targets" / "releases").glob(f"*/*.{name}_{version}.tar.gz"))
        assert len(found) == 1, f"{name}_{version} is served {len(found)} times: {found}"
        return found[0]


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Repo, RepoServer]]:
    repo = Repo(tmp_path_factory.mktemp("repo"))
    with RepoServer(repo.dir) as server:
        yield repo, server


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "nodes"
    path.mkdir()
    return path


@pytest.fixture
def agent_settings(state_dir: Path) -> Iterator[Callable[..., Any]]:
    """The configuration of agent code run in the test process (agent.config), like
    pytest-django's `settings`: change(**fields) replaces fields until the test ends."""
    from agent import config

    before = config.config()
    config.configure(replace(before, state_dir=state_dir))

    def change(**fields: Any) -> Any:
        config.configure(replace(config.config(), **fields))
        return config.config()

    yield change
    config.configure(before)


@pytest.fixture
def make_node(state_dir: Path) -> Callable[..., Any]:
    """A Node row plus its simulated appliance, with a name no other test uses."""
    from agent.drivers.simulated import SimulatedDriver
    from nodes.models import Node
    from updates.demo import DEMO_RELEASES

    def make(prefix: str = "gw", *, cluster: Any = None, users: tuple[str, ...] = ("alice", "bob"),
             version: str = "2.1.0") -> Node:  # fmt: skip
        hostname = f"{prefix}{next(_names)}-{uuid.uuid4().hex[:4]}"
        node = Node.objects.create(hostname=hostname, cluster=cluster)
        packages = next(p for _, v, *_, p in DEMO_RELEASES if v == version)
        SimulatedDriver(hostname, state_dir / hostname).seed(
            version=version, packages=packages, users=list(users), cluster=cluster is not None
        )
        accept_key(node, state_dir / hostname)
        return node

    return make


@pytest.fixture
def start_agent(redis_url: str, state_dir: Path, logs_dir: Path) -> Iterator[Callable[..., subprocess.Popen[Any]]]:
    """Start `python -m agent NODE` as a real process. It gets a DATABASE_URL and a
    DJANGO_SETTINGS_MODULE that cannot work: node agents never need either."""
    procs: list[subprocess.Popen[Any]] = []

    def start(hostname: str, *, repo_url: str, root: Path | str, **extra: str) -> subprocess.Popen[Any]:
        env = process_env(
            redis_url,
            DATABASE_URL="postgres://nobody@127.0.0.1:1/no-database-for-agents",
            DJANGO_SETTINGS_MODULE="no.such.settings",
            TGP_NODE_STATE_DIR=str(state_dir),
            TGP_REPO_URL=repo_url,
            TGP_REPO_ROOT_FILE=str(root),
            **extra,
        )
        log = open(logs_dir / f"agent-{hostname}.log", "a")
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", hostname], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
        procs.append(proc)
        return proc

    yield start
    stop_processes(procs)


@pytest.fixture
def agent_for(start_agent: Callable[..., Any], demo_repo: tuple[Repo, RepoServer], control_worker: str):
    """Start the agent of a node against the demo repository and wait for its first report."""
    from nodes.models import Node

    repo, server = demo_repo

    def start(node: Any, **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("repo_url", server.url)
        kw.setdefault("root", repo.root_file)
        proc = start_agent(node.hostname, **kw)
        wait_for(lambda: Node.objects.get(pk=node.pk).agent_instance, 60, f"the first report of {node}")
        return proc

    return start


@pytest.fixture
def wait_run() -> Callable[..., Any]:
    from updates.models import UpdateRun

    def wait(run: Any, state: str = "", timeout: float = 90.0) -> Any:
        ended = wait_for(
            lambda: UpdateRun.objects.filter(pk=run.pk).exclude(state=UpdateRun.State.RUNNING).first(),
            timeout,
            f"run {run.pk} to end",
        )
        if state:
            assert ended.state == state, f"run {run.pk} is {ended.state}: {ended.error}"
        return ended

    return wait


@pytest.fixture
def staff(db: Any) -> Callable[..., Any]:
    """Staff users: make("viewer") may only look; make("op", "update") is in group update."""
    from django.contrib.auth.models import Group, Permission, User

    def make(username: str, group: str | None = None) -> User:
        user = User.objects.create_user(username, password="pw-for-tests-only", is_staff=True)
        if group:
            user.groups.add(Group.objects.get(name=group))
        else:
            user.user_permissions.add(*Permission.objects.filter(codename__startswith="view_"))
        return user

    return make


@pytest.fixture
def releases(db: Any) -> dict[str, Any]:
    """Release rows as the demo repository has them (no HTTP involved)."""
    from updates.demo import DEMO_RELEASES
    from updates.models import Package, Release

    made = {}
    for channel, version, needs_reboot, hotfix, notes, packages in DEMO_RELEASES:
        release = Release.objects.create(
            version=version, channel=channel, needs_reboot=needs_reboot, hotfix=hotfix, notes=notes
        )
        for name, pkg_version in packages.items():
            Package.objects.create(
                release=release, name=name, version=pkg_version, file=f"pool/{name}_{pkg_version}.tar.gz",
                size=1, sha256="0" * 64,
            )  # fmt: skip
        made[version] = release
    return made


@pytest.fixture
def beat(redis_url: str, control_worker: str, logs_dir: Path) -> Iterator[subprocess.Popen[Any]]:
    """A real celery beat with the database scheduler, on the test database."""
    cmd = [sys.executable, "-m", "celery", "-A", "tgpadmin", "beat", "-l", "INFO", "--max-interval", "1"]
    cmd += ["--pidfile=", "-s", str(logs_dir / "beat-schedule")]
    log = open(logs_dir / "beat.log", "a")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=process_env(redis_url, DATABASE_URL=test_database_url()), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent,
    )  # fmt: skip
    yield proc
    stop_process(proc)
    log.close()


class FlakyRepoServer(RepoServer):
    """A repository server that answers 500 to every request until `fail_first`
    metadata refreshes have been counted (each begins with a request for the next root)."""

    def __init__(self, directory: Path, fail_first: int) -> None:
        super().__init__(directory)
        self.fail_first = fail_first
        self.refreshes = 0
        server = self

        def handler(*args: Any, **kwargs: Any) -> Any:
            return _FlakyHandler(server, *args, **kwargs)

        self.httpd.RequestHandlerClass = handler  # type: ignore[assignment]


from tests.servers import _RepoHandler  # noqa: E402


class _FlakyHandler(_RepoHandler):
    def __init__(self, server: FlakyRepoServer, *args: Any, **kwargs: Any) -> None:
        self.flaky = server
        super().__init__(*args, directory=str(server.directory), **kwargs)

    def do_GET(self) -> None:
        if self.path.endswith(".root.json"):
            self.flaky.refreshes += 1
        if self.flaky.refreshes <= self.flaky.fail_first:
            self.send_error(500)
            return
        super().do_GET()


@pytest.fixture
def running_run(make_node: Callable[..., Any], releases: dict[str, Any]) -> Any:
    """A running Auto-Update run of a new node, its steps pending; no worker behind it."""
    from updates.models import UpdateRun, UpdateStep
    from updates.runs import start

    node = make_node("gw")
    run = UpdateRun.objects.create(node=node, release=releases["2.2.0"], message="m")
    UpdateStep.objects.bulk_create(
        UpdateStep(run=run, name=name, position=i) for i, name in enumerate(start.plan_steps(node, run.trigger))
    )
    return run
