"""Download-only time control (the manual's "set a time-controlled download"): the
newest release is downloaded onto the node without maintenance mode or a notice;
the next update uses the verified files and fetches no package again. The warning
flag is cleared only by a complete download of an update's files."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from nodes.models import Node
from tests.conftest import Repo, wait_for
from tests.servers import RepoServer
from updates import scheduled
from updates.models import UpdateRun, UpdateSchedule
from updates.runs.reports import record_step
from updates.runs.start import UpdateRefused, check_can_start, start_update


@pytest.mark.django_db(transaction=True)
@pytest.mark.workflow
@pytest.mark.timeout(240)
def test_a_download_only_schedule_downloads_and_the_next_auto_update_fetches_no_package(
    tmp_path, make_node, start_agent, control_worker, wait_run, state_dir, settings
):
    repo = Repo(tmp_path / "repo")
    repo.import_releases()
    with RepoServer(repo.dir) as server:
        settings.TGP_REPO_URL, settings.TGP_REPO_ROOT_FILE = server.url, repo.root_file
        node = make_node("gw", users=("alice",))
        start_agent(node.hostname, repo_url=server.url, root=repo.root_file)
        wait_for(lambda: Node.objects.get(pk=node.pk).agent_instance, 60, "the agent")
        Node.objects.filter(pk=node.pk).update(download_warning=True)
        schedule = UpdateSchedule.objects.create(
            name="fetch", node=node, run_at=timezone.now() + timedelta(hours=2), download_only=True
        )
        assert not schedule.update_task.enabled, "a download-only schedule has no update to fire"

        assert "download only" in scheduled.fire(schedule.pk, "download")
        run = UpdateRun.objects.get(node=node)
        assert run.trigger == "download"
        wait_run(run, "succeeded")
        # The step's report and the chain's end travel as separate messages: either may land first.
        wait_for(lambda: not Node.objects.get(pk=node.pk).download_warning, 10, "a complete download clears the flag")
        node.refresh_from_db()
        assert not node.maintenance_mode
        state = json.loads((state_dir / node.hostname / "state.json").read_text())
        assert state["sessions"] and not state.get("logged_off"), "users keep working"
        assert all(not session.get("inbox") for session in state["sessions"].values()), "and get no notice"
        packages = [r for r in server.behaviour.requests if "/targets/" in r["path"]]
        assert packages, "the download fetched the packages"

        before = len(server.behaviour.requests)
        update = start_update(node, run.release)
        wait_run(update, "succeeded")
        after = server.behaviour.requests[before:]
        assert not [r for r in after if "/targets/" in r["path"]], f"no package fetched again: {after}"
        node.refresh_from_db()
        assert node.installed_version == run.release.version


@pytest.mark.django_db
def test_an_auto_update_during_a_download_only_run_is_refused_with_the_reason(
    make_node, releases, django_capture_on_commit_callbacks
):
    node = make_node("gw")
    with django_capture_on_commit_callbacks(execute=False):
        run = start_update(node, releases["2.2.0"], trigger=UpdateRun.Trigger.DOWNLOAD)
    node.refresh_from_db()
    assert not node.maintenance_mode
    with pytest.raises(UpdateRefused, match=f"is downloading the update files .*run {run.pk}.*try again"):
        check_can_start(node, releases["2.2.0"], UpdateRun.Trigger.MANUAL)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("trigger", "packages", "cleared"),
    [
        (UpdateRun.Trigger.CATCHUP_PARTIAL, ["tgpro-browser"], False),
        (UpdateRun.Trigger.CATCHUP_FULL, [], True),
        (UpdateRun.Trigger.DOWNLOAD, [], True),
        (UpdateRun.Trigger.MANUAL, [], True),
    ],
)
def test_only_a_complete_download_of_an_update_clears_the_warning_flag(
    make_node, releases, django_capture_on_commit_callbacks, trigger, packages, cleared
):
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(download_warning=True, download_warning_since=timezone.now())
    release = releases["2.0.0"] if trigger.startswith("catchup") else releases["2.2.0"]
    with django_capture_on_commit_callbacks(execute=False):
        run = start_update(node, release, trigger=trigger, packages=packages)
        record_step(run.pk, "download", "succeeded")
    node.refresh_from_db()
    assert node.download_warning is not cleared
