"""The beat signs the repository's snapshot and timestamp again before they expire,
and the system checks say when it cannot."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.core.checks import run_checks

from agent.shared.repository import MetadataExpired, repo_client, trusted_index
from tests.conftest import Repo
from tests.servers import RepoServer
from updates import tasks
from updates.repository import Store


@pytest.fixture
def kept_here(tmp_path: Path, settings) -> Repo:
    """A repository this host keeps, published 13 hours ago: its one-day timestamp has
    less than half its life left."""
    repo = Repo(tmp_path / "repo", package_bytes=1024, now=datetime.now(UTC) - timedelta(hours=13))
    settings.TGP_REPO_DIR, settings.TGP_REPO_KEYS_DIR = repo.dir, repo.keys
    return repo


def test_the_beat_runs_the_resigning_task_on_the_control_queue():
    entry = django_settings.CELERY_BEAT_SCHEDULE["resign-repository"]
    assert entry["task"] == tasks.resign_repository.name == "control.resign_repository"
    assert entry["options"] == {"queue": django_settings.CONTROL_QUEUE}
    assert entry["schedule"] == 3600.0, "hourly: a one-day timestamp is renewed long before it expires"


def test_the_task_signs_a_timestamp_again_when_half_its_life_has_passed(kept_here):
    store = Store(kept_here.dir, kept_here.keys)
    before = store.timestamp().signed

    assert tasks.resign_repository() == ["timestamp"]

    after = store.timestamp().signed
    assert after.version == before.version + 1
    assert after.expires - datetime.now(UTC) > timedelta(hours=23), "a new day from now"
    assert tasks.resign_repository() == [], "nothing to do until half of the new day has passed"


def test_a_node_refuses_the_frozen_repository_and_accepts_it_once_the_beat_signed_it(settings, tmp_path):
    # A day and a half without the beat: the node refuses (a freeze); the task signs it again; accepted.
    day_old = Repo(tmp_path / "old", package_bytes=1024, now=datetime.now(UTC) - timedelta(hours=36))
    expired = pytest.raises(MetadataExpired, match="timestamp.json is expired")
    with RepoServer(day_old.dir) as server, repo_client(5) as client, expired:
        trusted_index(tmp_path / "node", server.url, day_old.root_file.read_bytes(), client=client)
    settings.TGP_REPO_DIR, settings.TGP_REPO_KEYS_DIR = day_old.dir, day_old.keys
    assert tasks.resign_repository() == ["timestamp"]
    with RepoServer(day_old.dir) as server, repo_client(5) as client:
        index = trusted_index(tmp_path / "node", server.url, day_old.root_file.read_bytes(), client=client)
    assert index.newest("stable") is not None


def test_a_host_without_a_repository_has_nothing_to_sign(settings, tmp_path):
    settings.TGP_REPO_DIR = tmp_path / "none"
    assert tasks.resign_repository() == []


def test_a_repository_kept_here_without_its_timestamp_key_is_a_system_check_warning(kept_here):
    assert "tgpadmin.W003" not in {m.id for m in run_checks()}
    for key in kept_here.keys.glob("timestamp-*.key"):
        key.unlink()
    found = [m for m in run_checks() if m.id == "tgpadmin.W003"]
    assert found and "timestamp key" in found[0].msg
    with pytest.raises(Exception, match="timestamp role needs 1 of its keys"):
        tasks.resign_repository()


def test_an_online_role_with_fewer_keys_here_than_its_threshold_is_a_system_check_warning(kept_here):
    from updates.repository import rotate_keys

    root = rotate_keys(kept_here.dir, kept_here.keys, "timestamp", count=2, threshold=2)
    assert "tgpadmin.W003" not in {m.id for m in run_checks()}
    # One of the two current keys gone (the revoked one's file stays, and does not count).
    (kept_here.keys / f"timestamp-{sorted(root.roles['timestamp'].keyids)[0]}.key").unlink()
    found = [m for m in run_checks() if m.id == "tgpadmin.W003"]
    assert found and "timestamp key" in found[0].msg
