"""Checks before disruption (issue 15): on every path the node has the verified files
before its users are logged off, and a release withdrawn from the repository is never
chosen, nor installed. Real Redis, a real control worker and real node agents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodes import services
from nodes.models import Node
from tests.conftest import FlakyRepoServer, Repo
from tests.servers import RepoServer
from updates.models import Release, UpdateLock, UpdateStep
from updates.runs import start


def workflow(test):  # noqa: ANN001, ANN201
    """Real processes on a database they can see: transactions, the workflow marker."""
    for mark in (pytest.mark.django_db(transaction=True), pytest.mark.workflow, pytest.mark.timeout(240)):
        test = mark(test)
    return test


# The agent's download retries, quick: a repository that stays down fails the run in seconds.
QUICK_RETRIES = {"TGP_DOWNLOAD_ATTEMPTS": "2", "TGP_DOWNLOAD_BACKOFF": "1", "TGP_DOWNLOAD_BACKOFF_MAX": "1"}


def appliance(state_dir: Path, node: Node) -> dict:
    return json.loads((state_dir / node.hostname / "state.json").read_text())


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def broken_repo(tmp_path: Path, fault: str, version: str) -> tuple[Repo, str]:
    """A repository with `fault`, and the public key the agent pins."""
    repo = Repo(tmp_path / "repo")
    if fault == "corrupted_package":
        corrupt(repo.pool_file("tgpro-browser", version))
        return repo, repo.pubkey
    if fault == "bad_signature":
        return repo, Repo(tmp_path / "other").pubkey  # the index is signed with another key
    return repo, repo.pubkey


def server_for(repo: Repo, fault: str) -> RepoServer:
    # "server_down": every request answered 500, attempt after attempt.
    return FlakyRepoServer(repo.dir, fail_first=10**6) if fault == "server_down" else RepoServer(repo.dir)


CAUSES = {
    "corrupted_package": "does not match the signed index",
    "bad_signature": "signature",
    "server_down": "HTTP 500",
}


def assert_nobody_logged_off(state_dir: Path, node: Node, users: set[str]) -> None:
    state = appliance(state_dir, node)
    assert set(state["sessions"]) == users, "every user is still logged in"
    assert state["logged_off"] == [], "nobody was logged off"
    assert state["logon_enabled"] is True, "logon stays on"
    assert state["installed_version"] == "2.1.0" and state["installs"] == {}


@workflow
@pytest.mark.parametrize("fault", sorted(CAUSES))
def test_an_autoupdate_whose_download_fails_logs_nobody_off(
    fault, tmp_path, make_node, start_agent, control_worker, wait_run, state_dir
):
    repo, pubkey = broken_repo(tmp_path, fault, "2.2.0")
    repo.import_releases()
    node = make_node("gw", users=("alice", "bob"))
    with server_for(repo, fault) as server:
        start_agent(node.hostname, repo_url=server.url, pubkey=pubkey, **QUICK_RETRIES)
        run = start.start_update(Node.objects.get(pk=node.pk), Release.objects.get(version="2.2.0"))
        run = wait_run(run, "failed", timeout=120)

    assert run.error.startswith("download:") and CAUSES[fault] in run.error, run.error
    assert_nobody_logged_off(state_dir, node, {"alice", "bob"})
    assert UpdateStep.objects.get(run=run, name="drain").state == "pending"
    assert UpdateLock.objects.get(node=node, removed_at=None).run_id == run.pk, "the lock is set as before"
    node.refresh_from_db()
    # The manual: only an error-free run ends maintenance mode (docs/architecture.md).
    assert node.maintenance_mode


@workflow
@pytest.mark.parametrize("partial", [True, False], ids=["partial", "full"])
def test_a_catchup_whose_download_fails_logs_nobody_off(
    partial, tmp_path, make_node, start_agent, control_worker, wait_run, state_dir
):
    repo, pubkey = broken_repo(tmp_path, "corrupted_package", "2.0.0")
    repo.import_releases()
    node = make_node("gw", users=("carol",))
    with server_for(repo, "corrupted_package") as server:
        start_agent(node.hostname, repo_url=server.url, pubkey=pubkey, **QUICK_RETRIES)
        packages = ["tgpro-browser"] if partial else None
        run = services.start_catchup(Node.objects.get(pk=node.pk), None, packages)
        run = wait_run(run, "failed", timeout=120)

    assert run.error.startswith("download:") and "tgpro-browser_2.0.0" in run.error, run.error
    assert_nobody_logged_off(state_dir, node, {"carol"})
    assert UpdateStep.objects.get(run=run, name="drain").state == "pending"
