"""Checks before disruption (issue 15): on every path the node has the verified files
before its users are logged off, and a release withdrawn from the repository is never
chosen, nor installed. Real Redis, a real control worker and real node agents."""

from __future__ import annotations

import json
import shutil
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.urls import reverse
from django.utils import timezone

from agent.shared.repository import RepositoryIndex
from nodes import services
from nodes.models import Cluster, Node
from tests.conftest import FlakyRepoServer, Repo, wait_for
from tests.servers import RepoServer
from updates import scheduled
from updates.demo import write_demo_sources
from updates.models import Release, UpdateLock, UpdateRun, UpdateSchedule, UpdateStep
from updates.releases import import_index
from updates.runs import cluster_cap, start
from updates.runs.start import StartChecks


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


def broken_repo(tmp_path: Path, fault: str, version: str) -> tuple[Repo, Path]:
    """A repository with `fault`, and the root the agent pins."""
    repo = Repo(tmp_path / "repo")
    if fault == "corrupted_package":
        corrupt(repo.pool_file("tgpro-browser", version))
        return repo, repo.root_file
    if fault == "bad_signature":
        return repo, Repo(tmp_path / "other").root_file  # the metadata is signed with other keys
    return repo, repo.root_file


def server_for(repo: Repo, fault: str) -> RepoServer:
    # "server_down": every request answered 500, attempt after attempt.
    return FlakyRepoServer(repo.dir, fail_first=10**6) if fault == "server_down" else RepoServer(repo.dir)


CAUSES = {
    "corrupted_package": "does not match its signed target info",
    "bad_signature": "not signed by enough trusted keys",
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
    repo, root = broken_repo(tmp_path, fault, "2.2.0")
    repo.import_releases()
    node = make_node("gw", users=("alice", "bob"))
    with server_for(repo, fault) as server:
        start_agent(node.hostname, repo_url=server.url, root=root, **QUICK_RETRIES)
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
    repo, root = broken_repo(tmp_path, "corrupted_package", "2.0.0")
    repo.import_releases()
    node = make_node("gw", users=("carol",))
    with server_for(repo, "corrupted_package") as server:
        start_agent(node.hostname, repo_url=server.url, root=root, **QUICK_RETRIES)
        packages = ["tgpro-browser"] if partial else None
        run = services.start_catchup(Node.objects.get(pk=node.pk), None, packages)
        run = wait_run(run, "failed", timeout=120)

    assert run.error.startswith("download:") and "tgpro-browser_2.0.0" in run.error, run.error
    assert_nobody_logged_off(state_dir, node, {"carol"})
    assert UpdateStep.objects.get(run=run, name="drain").state == "pending"


# --- withdrawn releases ---------------------------------------------------------------


def withdraw(repo: Repo, channel: str, version: str) -> RepositoryIndex:
    """Publish new targets (version + 1) without the release; its files stay on the server."""
    shutil.rmtree(repo.root / "src" / channel / version)
    return repo.publish()


def republish(repo: Repo) -> RepositoryIndex:
    write_demo_sources(repo.root / "src", package_bytes=64 * 1024)
    return repo.publish()


@pytest.mark.django_db
def test_a_release_the_index_no_longer_lists_is_withdrawn_and_never_chosen(tmp_path, make_node):
    repo = Repo(tmp_path / "repo")
    repo.import_releases()
    node = make_node("gw", version="2.1.0")
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0")
    node.refresh_from_db()
    assert scheduled.updates_for(node).version == "2.2.0"

    import_index(withdraw(repo, "stable", "2.2.0"))
    withdrawn = Release.objects.get(version="2.2.0")
    assert withdrawn.withdrawn_at is not None
    assert Release.objects.filter(withdrawn_at=None).count() == 2
    assert Release.newest("stable").version == "2.1.0"
    assert StartChecks.read([node]).newest["stable"].version == "2.1.0"
    assert scheduled.updates_for(node) is None, "the schedule finds no update"
    (plan,) = services.plan_updates([node])
    assert plan.release.version == "2.1.0" and "already runs" in plan.refusal
    with pytest.raises(start.UpdateRefused, match="release 2.2.0 was withdrawn from the repository"):
        start.start_update(node, withdrawn)

    import_index(withdraw(repo, "oldstable", "2.0.0"))
    assert services.oldstable_release() is None
    with pytest.raises(start.UpdateRefused, match="No oldstable release"):
        services.start_catchup(node, None)

    import_index(republish(repo))  # listed again: withdrawn no longer
    assert not Release.objects.exclude(withdrawn_at=None).exists()
    assert Release.newest("stable").version == "2.2.0" and services.oldstable_release().version == "2.0.0"


@pytest.mark.django_db
def test_a_catchup_to_a_withdrawn_oldstable_release_is_refused(make_node, releases):
    Release.objects.filter(pk=releases["2.0.0"].pk).update(withdrawn_at=timezone.now())
    node = make_node("gw")
    with pytest.raises(start.UpdateRefused, match="release 2.0.0 was withdrawn"):
        start.start_update(node, Release.objects.get(version="2.0.0"), trigger=UpdateRun.Trigger.CATCHUP_FULL)
    assert not UpdateRun.objects.exists()


@pytest.mark.django_db
def test_the_admin_shows_withdrawn_releases_as_such(client, staff, releases):
    Release.objects.filter(pk=releases["2.1.0"].pk).update(withdrawn_at=timezone.now())
    client.force_login(staff("viewer"))
    url = reverse("admin:updates_release_changelist")
    withdrawn = client.get(url, {"withdrawn": "yes"})
    assert withdrawn.status_code == 200
    assert "2.1.0" in withdrawn.text and "2.2.0" not in withdrawn.text and "withdrawn 20" in withdrawn.text
    listed = client.get(url, {"withdrawn": "no"}).text
    assert "2.2.0" in listed and "2.1.0" not in listed


@pytest.mark.django_db
def test_a_cluster_node_whose_release_is_withdrawn_takes_no_slot(
    make_node, releases, django_capture_on_commit_callbacks
):
    cluster = Cluster.objects.create(name=f"withdrawn-{uuid.uuid4().hex[:8]}", max_parallel_updates=1)
    node = make_node("c", cluster=cluster)
    with django_capture_on_commit_callbacks(execute=False):
        run = start.start_update(Node.objects.get(pk=node.pk), releases["2.2.0"])
    Release.objects.filter(pk=releases["2.2.0"].pk).update(withdrawn_at=timezone.now())
    with django_capture_on_commit_callbacks(execute=False) as queued:
        cluster_cap.take_slot(run.pk)
    run.refresh_from_db()
    assert run.state == "failed" and run.error == "release 2.2.0 was withdrawn from the repository"
    assert queued == [], "nothing disruptive is queued"
    assert node.hostname not in {h.node for h in cluster_cap.cluster_slots().holders(cluster.name)}
    assert UpdateLock.objects.get(node=node, removed_at=None).run_id == run.pk


@workflow
def test_a_release_withdrawn_while_it_downloads_fails_the_run_before_drain(
    tmp_path, make_node, start_agent, control_worker, wait_run, state_dir
):
    repo = Repo(tmp_path / "repo", package_bytes=1024 * 1024)
    repo.import_releases()
    node = make_node("gw", users=("alice", "bob"))
    with RepoServer(repo.dir, rate=1024 * 1024) as server:
        start_agent(node.hostname, repo_url=server.url, root=repo.root_file, **QUICK_RETRIES)
        wait_for(lambda: Node.objects.get(pk=node.pk).agent_instance, 60, "the agent")
        run = start.start_update(Node.objects.get(pk=node.pk), Release.objects.get(version="2.2.0"))
        download = UpdateStep.objects.filter(run=run, name="download")
        wait_for(lambda: download.get().bytes_done > 0, 60, "the download to be under way")
        import_index(withdraw(repo, "stable", "2.2.0"))  # sync_releases meanwhile
        run = wait_run(run, "failed", timeout=120)

    assert download.get().state == "failed"
    assert "release 2.2.0 was withdrawn from the repository" in run.error, run.error
    assert UpdateStep.objects.get(run=run, name="drain").state == "pending"
    assert_nobody_logged_off(state_dir, node, {"alice", "bob"})


@workflow
def test_a_scheduled_run_whose_release_is_withdrawn_fails_before_its_update_phase_drains(
    tmp_path, make_node, start_agent, control_worker, wait_run, state_dir, settings
):
    repo = Repo(tmp_path / "repo")
    settings.TGP_REPO_ROOT_FILE = repo.root_file  # the control plane syncs the index at each firing
    repo.import_releases()
    node = make_node("gw", users=("alice",))
    with RepoServer(repo.dir) as server:
        settings.TGP_REPO_URL = server.url
        start_agent(node.hostname, repo_url=server.url, root=repo.root_file)
        wait_for(lambda: Node.objects.get(pk=node.pk).agent_instance, 60, "the agent")
        schedule = UpdateSchedule.objects.create(
            name="withdrawn", node=node, run_at=timezone.now() + timedelta(hours=2), download_lead=timedelta(hours=1)
        )
        scheduled.fire(schedule.pk, "download")
        run = UpdateRun.objects.get(node=node)
        download = UpdateStep.objects.filter(run=run, name="download")
        wait_for(lambda: download.get().state == "succeeded", 60, "the download ahead of the update")

        withdraw(repo, "stable", "2.2.0")  # published; the update firing syncs it
        now = timezone.now()  # instead of waiting two hours: the update time has come
        UpdateSchedule.objects.filter(pk=schedule.pk).update(run_at=now)
        UpdateRun.objects.filter(pk=run.pk).update(scheduled_for=now)
        scheduled.fire(schedule.pk, "update")
        run = wait_run(run, "failed", timeout=60)

    assert run.error == "release 2.2.0 was withdrawn from the repository"
    assert Release.objects.get(version="2.2.0").withdrawn_at is not None
    assert UpdateStep.objects.get(run=run, name="drain").state == "pending"
    assert_nobody_logged_off(state_dir, node, {"alice"})
