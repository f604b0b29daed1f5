"""The node side of a run: plain functions the agent's tasks call.

They never touch the database. What they need comes in the step command (run
id, version, package names, message) and from the repository's TUF metadata, which
each node verifies itself (agent/shared/repository.py); what they did goes
back to the control plane through ``report``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis

from agent.config import config
from agent.download import MinRate, download_package
from agent.drivers.base import Driver
from agent.shared.protocol import (
    LONGEST_LOGOFF_WAIT,
    VERSION_RE,
    StepCommand,
    parse_slot_holder,
    render_notice,
    slot_keys,
    version_key,
)
from agent.shared.repository import (
    PackageEntry,
    PackageVerificationError,
    RepositoryIndex,
    last_verified_index,
    metadata_dir_for,
    package_url,
    repo_client,
    trusted_index,
    verify_package,
)
from agent.shared.sentinel import Sentinel, redis_client

Report = Callable[..., None]


def selected(release_packages: tuple[PackageEntry, ...], names: tuple[str, ...]) -> list[PackageEntry]:
    if not names:
        return list(release_packages)
    chosen = [p for p in release_packages if p.name in set(names)]
    missing = set(names) - {p.name for p in chosen}
    if missing:
        raise ValueError(f"not in the release: {', '.join(sorted(missing))}")
    return chosen


POOL_SIZE = 100  # connections of the agent's own broker client, at least (redis-py's default)


class FenceLost(RuntimeError):
    """This node no longer holds the cluster slot it was given: it must not go on."""


@functools.cache
def _redis(url: str, sentinel: Sentinel | None = None, connections: int = POOL_SIZE) -> redis.Redis:
    """One client (and connection pool) per process, not a connection per check; through
    Sentinel, one of whichever server is the primary (it outlasts a failover)."""
    return redis_client(url, sentinel, max_connections=connections)


def broker() -> redis.Redis:
    """This node's own connection to the broker outside Celery: the fencing check, heartbeats.
    A worker that plays many nodes (a benchmark's) may check all their fences at one
    instant: redis-py 8 caps a pool at 100 connections and fails the next check with
    MaxConnectionsError (441 drains failed so at 2,500 nodes), so the pool grows with
    the nodes served."""
    cfg = config()
    return _redis(cfg.redis_url, cfg.redis_sentinel, max(POOL_SIZE, 2 * len(cfg.served)))


def check_fence(command: StepCommand) -> None:
    """Before anything disruptive on a cluster node: is our update slot still ours?
    An operator may have released it, and another node may hold it now."""
    if not command.cluster:
        return
    held = None
    if command.fence is not None:
        held = broker().hget(slot_keys(command.cluster)[0], command.node)
    if held is None or parse_slot_holder(held)[0] != command.fence:
        raise FenceLost(
            f"{command.node} does not hold update slot {command.fence} of {command.cluster} any more; stopped"
        )


def notify(driver: Driver, command: StepCommand, report: Report) -> None:
    count = driver.notify(f"run-{command.run}", render_notice(command.message, command.at, config().time_zone))
    report("succeeded", detail=f"maintenance mode on; notice sent to {count} logged-in user(s)")


def exclude(driver: Driver, command: StepCommand, report: Report) -> None:
    # No fencing check: leaving the load balancer logs nobody off, and the update slot
    # (whose token the check asks about) is taken after it, before the drain.
    driver.exclude()
    report("succeeded", detail="out of the load balancer; logged-in users keep working for the lead time")


def until_logoff(
    command: StepCommand, *, clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep
) -> float:
    """A drain that came ahead of its users' time (StepCommand.at: the control plane took
    the update slot early, so that a busy control queue at that instant delays nobody)
    waits for it by this node's clock, the clock its users' notice was written in; at
    most LONGEST_LOGOFF_WAIT. Called before the step starts: the step's start is the
    moment its users are logged off. Returns the seconds waited."""
    if command.at is None:
        return 0.0
    wait = min(command.at - clock(), LONGEST_LOGOFF_WAIT)
    if wait <= 0:
        return 0.0
    sleep(wait)
    return wait


def drain(driver: Driver, command: StepCommand, report: Report) -> None:
    check_fence(command)
    users = driver.drain(command.run)
    who = ", ".join(users) if users else "nobody was logged in"
    report("succeeded", detail=f"logon off, out of the load balancer; logged off: {who}")


class _Throttle:
    """Progress reports at most every 0.25 s, the first after 0.25 s: one message per
    chunk would flood the control queue, and a download of a moment needs none."""

    def __init__(self, report: Report, total: int) -> None:
        self.report, self.total, self.base, self.last = report, total, 0, time.monotonic()

    def __call__(self, done: int, _size: int) -> None:
        now = time.monotonic()
        if now - self.last >= 0.25:
            self.last = now
            self.report("progress", bytes_done=self.base + done, bytes_total=self.total)


def metadata_dir(driver: Driver, root: bytes) -> Path:
    """The repository metadata this node verified from its pinned root, and the versions
    it has seen (a rollback to lower ones is refused)."""
    return metadata_dir_for(driver.state_dir / "tuf", root)


def refreshed(client: httpx.Client, driver: Driver) -> RepositoryIndex:
    root = config().trusted_root()
    return trusted_index(metadata_dir(driver, root), config().repo_url, root, client=client)


def download(driver: Driver, command: StepCommand, report: Report) -> None:
    with repo_client(config().download_timeout) as client:
        index = refreshed(client, driver)
        release = index.release(command.version)
        packages = selected(release.packages, command.packages)
        total = sum(p.size for p in packages)
        fetch_packages(client, driver, release.version, packages, _Throttle(report, total))
        # The metadata once more, before anyone is logged off: a release withdrawn while
        # its files came is not installed, and one published again is checked anew.
        latest = refreshed(client, driver)
        if latest.serial != index.serial:
            release = latest.release(command.version)
            packages = selected(release.packages, command.packages)
            fetch_packages(client, driver, release.version, packages)  # a file that matches costs no request
    report(
        "succeeded", bytes_done=total, bytes_total=total, detail=f"{len(packages)} package(s), {total} bytes verified"
    )


def fetch_packages(
    client: httpx.Client,
    driver: Driver,
    version: str,
    packages: list[PackageEntry],
    throttle: _Throttle | None = None,
) -> list[tuple[PackageEntry, Path]]:
    """Each package in the download directory, checked against its signed target info:
    a file that is there and matches costs no request; anything else is fetched."""
    files = []
    for entry in packages:
        path = driver.download_dir(version) / Path(entry.file).name
        download_package(
            client,
            package_url(config().repo_url, entry),
            path,
            size=entry.size,
            sha256=entry.sha256,
            chunk_size=config().download_chunk,
            progress=throttle,
            min_rate=MinRate(config().download_min_rate),
        )
        if throttle is not None:
            throttle.base += entry.size
        files.append((entry, path))
    return files


def verified_files(driver: Driver, version: str, packages: list[PackageEntry]) -> list[tuple[PackageEntry, Path]]:
    """The downloaded packages, each checked by TUF against its signed target info right
    before it is installed. One that a power cut ate (downloads are not fsynced) or that
    does not match is fetched again: a download, not a failed run."""
    missing = []
    for entry in packages:
        try:
            verify_package(entry, driver.download_dir(version) / Path(entry.file).name)
        except (OSError, PackageVerificationError):
            missing.append(entry)
    if missing:
        with repo_client(config().download_timeout) as client:
            fetch_packages(client, driver, version, missing)
    return [(entry, driver.download_dir(version) / Path(entry.file).name) for entry in packages]


def verified_index(driver: Driver) -> RepositoryIndex:
    """The releases of the metadata this node last verified, checked again (no network)."""
    return last_verified_index(metadata_dir(driver, config().trusted_root()))


class DowngradeRefused(RuntimeError):
    """An older release than the node runs, without an operator's catch-up from Oldstable."""


def check_not_older(driver: Driver, command: StepCommand) -> None:
    installed = str(driver.snapshot().get("installed_version", ""))
    if command.catchup or not VERSION_RE.match(installed):
        return
    if version_key(command.version) < version_key(installed):
        raise DowngradeRefused(
            f"{command.node} runs {installed}: refusing to install the older {command.version} "
            "(only an operator's catch-up from Oldstable may)"
        )


def install(driver: Driver, command: StepCommand, report: Report) -> None:
    check_fence(command)
    check_not_older(driver, command)
    release = verified_index(driver).release(command.version)
    files = verified_files(driver, release.version, selected(release.packages, command.packages))
    detail = driver.install(command.run, release.version, files, full=not command.packages)
    report("succeeded", detail=detail)


def needs_reboot(driver: Driver, command: StepCommand) -> bool:
    return verified_index(driver).release(command.version).needs_reboot


def resume(driver: Driver, command: StepCommand, report: Report) -> None:
    driver.resume()
    report("succeeded", detail="maintenance off, logon on, back in the load balancer")
