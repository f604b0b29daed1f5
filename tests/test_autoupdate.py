"""Auto-Update end to end: real Redis, a real control worker and real node agents
(`python -m agent`, simulated appliance), downloads over loopback HTTP."""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest

from agent.shared.protocol import WHEN
from nodes.models import Node
from tests.conftest import Repo, wait_for
from tests.servers import RepoServer
from updates.models import Release, UpdateLock, UpdateRun, UpdateStep
from updates.runs import locks, recovery, start

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workflow, pytest.mark.timeout(240)]


def appliance(state_dir: Path, node: Node) -> dict:
    return json.loads((state_dir / node.hostname / "state.json").read_text())


def current_release_dir(state_dir: Path, node: Node) -> str:
    return os.readlink(state_dir / node.hostname / "current")


def test_autoupdate_notifies_logs_off_installs_reboots_and_releases_logon(
    demo_repo, make_node, agent_for, wait_run, state_dir
):
    repo, _ = demo_repo
    repo.import_releases()
    node = make_node("gw", users=("alice", "bob"))
    agent_for(node)
    boot_before = Node.objects.get(pk=node.pk).boot_id

    run = start.start_update(Node.objects.get(pk=node.pk), Release.objects.get(version="2.2.0"))
    run = wait_run(run, "succeeded")

    state = appliance(state_dir, node)
    assert {entry["user"] for entry in state["logged_off"]} == {"alice", "bob"}
    told = run.message.replace(WHEN, "shortly")  # an Auto-Update logs users off right away
    assert WHEN in run.message and told != run.message
    for entry in state["logged_off"]:
        assert [n["message"] for n in entry["inbox"]] == [told], f"{entry['user']} got the notice first"
    assert state["sessions"] == {}
    assert state["installed_version"] == "2.2.0"
    assert state["logon_enabled"] is True and state["maintenance"] is False
    assert current_release_dir(state_dir, node) == f"releases/{run.pk}-2.2.0"
    assert (state_dir / node.hostname / "current" / "tgpro-browser" / "VERSION").read_text().strip() == "2.2.0"
    node.refresh_from_db()
    assert node.installed_version == "2.2.0"
    assert node.boot_id != boot_before
    assert node.logon_enabled and not node.maintenance_mode
    steps = {s.name: s for s in run.steps.all()}
    assert all(s.state == "succeeded" for s in steps.values()), {n: s.state for n, s in steps.items()}
    assert "alice, bob" in steps["drain"].detail
    assert steps["download"].bytes_done == steps["download"].bytes_total > 0
    assert not UpdateLock.objects.filter(node=node).exists()


def test_a_release_that_needs_no_reboot_is_installed_without_one(tmp_path, make_node, agent_for, wait_run, state_dir):
    from updates.demo import build_demo_package

    repo = Repo(tmp_path / "repo")
    release_dir = repo.root / "src" / "stable" / "2.3.0"
    release_dir.mkdir()
    (release_dir / "release.json").write_text(json.dumps({"notes": "hotfix", "needs_reboot": False}))
    for name in ("tgpro-base", "tgpro-browser", "tgpro-vnc"):
        (release_dir / f"{name}_2.3.0.tar.gz").write_bytes(build_demo_package(name, "2.3.0", package_bytes=1024))
    repo.publish()
    repo.import_releases()
    node = make_node("gw", version="2.2.0")
    boot_before = appliance(state_dir, node)["boot_id"]
    with RepoServer(repo.dir) as server:
        agent_for(node, repo_url=server.url, root=repo.root_file)
        run = start.start_update(Node.objects.get(pk=node.pk), Release.objects.get(version="2.3.0"))
        run = wait_run(run, "succeeded")

    # The run page lists what happened: no reboot step at all, verify right after install.
    names = list(run.steps.order_by("position").values_list("name", flat=True))
    assert names == ["notify", "download", "drain", "install", "verify", "resume"]
    assert all(state == "succeeded" for state in run.steps.values_list("state", flat=True))
    state = appliance(state_dir, node)
    assert state["installed_version"] == "2.3.0" and state["boot_id"] == boot_before
    node.refresh_from_db()
    assert node.installed_version == "2.3.0" and node.logon_enabled and not node.maintenance_mode


def test_users_get_the_notice_before_they_are_logged_off(demo_repo, make_node, agent_for, wait_run, state_dir):
    repo, _ = demo_repo
    repo.import_releases()
    node = make_node("gw", users=("carol",))
    agent_for(node)
    run = start.start_update(Node.objects.get(pk=node.pk), Release.objects.get(version="2.2.0"), message="Save now")
    wait_run(run, "succeeded")

    (carol,) = appliance(state_dir, node)["logged_off"]
    assert carol["user"] == "carol"
    assert [n["message"] for n in carol["inbox"]] == ["Save now"]
    assert carol["inbox"][0]["at"] <= carol["at"], "told before being logged off"
    notified_at = UpdateStep.objects.get(run=run, name="notify").finished_at
    assert notified_at <= UpdateStep.objects.get(run=run, name="drain").finished_at


@pytest.mark.parametrize("fault", ["corrupted_package", "bad_signature", "expired_index"])
def test_untrusted_repository_fails_run_locks_node_and_installs_nothing(
    fault, tmp_path, make_node, start_agent, control_worker, wait_run, state_dir
):
    if fault == "expired_index":
        repo = Repo(tmp_path / "repo", now=datetime.now(UTC) - timedelta(days=3))  # its timestamp: one day
    else:
        repo = Repo(tmp_path / "repo")
    root = repo.root_file
    if fault == "corrupted_package":
        pool = repo.pool_file("tgpro-browser", "2.2.0")
        data = bytearray(pool.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pool.write_bytes(bytes(data))
    elif fault == "bad_signature":
        other = Repo(tmp_path / "other")  # the agent pins another root than the one that signed
        root = other.root_file
    repo.import_releases()
    node = make_node("gw")
    before = current_release_dir(state_dir, node)
    with RepoServer(repo.dir) as server:
        # Expired metadata is retried like a network error (the beat may re-sign it, a
        # clock may be set right): two quick attempts, then the run fails as any download.
        start_agent(node.hostname, repo_url=server.url, root=root, TGP_DOWNLOAD_ATTEMPTS="2",
                    TGP_DOWNLOAD_BACKOFF="1", TGP_DOWNLOAD_BACKOFF_MAX="1")  # fmt: skip
        run = start.start_update(node, Release.objects.get(version="2.2.0"))
        run = wait_run(run, "failed")

    cause = {
        "corrupted_package": "does not match its signed target info",
        "bad_signature": "not signed by enough trusted keys",
        "expired_index": "repository metadata expired",
    }[fault]
    assert run.error.startswith("download:") and cause in run.error, run.error
    lock = UpdateLock.objects.get(node=node, removed_at=None)
    assert lock.run_id == run.pk
    state = appliance(state_dir, node)
    assert state["installed_version"] == "2.1.0" and state["installs"] == {}
    assert current_release_dir(state_dir, node) == before
    assert not (state_dir / node.hostname / "releases" / f"{run.pk}-2.2.0").exists()
    node.refresh_from_db()
    assert node.maintenance_mode, "a failed run leaves the node in maintenance"
    assert UpdateStep.objects.get(run=run, name="install").state == "pending"


def test_locked_node_refuses_autoupdate(demo_repo, make_node):
    repo, _ = demo_repo
    repo.import_releases()
    node = make_node("gw")
    locks.set_lock(node, "earlier failure")
    with pytest.raises(start.UpdateRefused, match="update lock"):
        start.start_update(node, Release.objects.get(version="2.2.0"))
    assert not UpdateRun.objects.filter(node=node).exists()


def test_agent_killed_during_download_resumes_with_range_and_succeeds(
    tmp_path, make_node, start_agent, control_worker, wait_run, state_dir
):
    repo = Repo(tmp_path / "repo", package_bytes=1024 * 1024)
    repo.import_releases()
    node = make_node("gw")
    with RepoServer(repo.dir, rate=600 * 1024) as server:
        # Written in 256 KiB batches (1 MiB by default): progress counts written bytes only.
        agent = start_agent(node.hostname, repo_url=server.url, root=repo.root_file, TGP_DOWNLOAD_CHUNK="262144")
        wait_for(lambda: Node.objects.get(pk=node.pk).agent_instance, 60, "agent report")
        run = start.start_update(Node.objects.get(pk=node.pk), Release.objects.get(version="2.2.0"))
        step = UpdateStep.objects.filter(run=run, name="download")
        wait_for(lambda: step.get().bytes_done > 200 * 1024, 60, "the download to be under way")
        (worker,) = psutil.Process(agent.pid).children()
        worker.send_signal(signal.SIGKILL)  # the agent's worker dies mid-download
        run = wait_run(run, "succeeded", timeout=120)
        ranges = [r["range"] for r in server.behaviour.requests if r["range"]]

    assert ranges, "the download resumed with an HTTP Range request"
    assert step.get().attempts == 2
    assert appliance(state_dir, node)["installed_version"] == "2.2.0"


def test_run_of_a_silent_node_fails_after_the_stall_timeout(demo_repo, make_node, control_worker, settings):
    repo, _ = demo_repo
    repo.import_releases()
    node = make_node("gw")  # no agent: nothing will ever answer
    run = start.start_update(node, Release.objects.get(version="2.2.0"))
    settings.TGP_RUN_STALL_TIMEOUT = 1.0
    UpdateRun.objects.filter(pk=run.pk).update(last_activity_at=run.last_activity_at - timedelta(seconds=5))

    assert recovery.reap_stale_runs() == 1
    run.refresh_from_db()
    assert run.state == "failed" and "no word from the node" in run.error
    assert UpdateLock.objects.filter(node=node, removed_at=None).exists()
