"""The command-line side: autoupdate, remove_update_lock, demo_fleet."""

from __future__ import annotations

import subprocess
import sys
from io import StringIO
from itertools import count

import pytest
from django.core.management import CommandError, call_command

from nodes.models import Cluster, Node
from tests.conftest import ROOT, process_env, test_database_url
from updates.models import Release, UpdateLock, UpdateRun, UpdateSchedule
from updates.runs import locks

_trios = count(1)


def run_cli(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


@pytest.mark.django_db
def test_autoupdate_without_yes_names_the_users_and_starts_nothing(make_node, releases):
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0", logged_in_users=["alice", "bob"])
    with pytest.raises(CommandError, match="alice, bob.*--yes"):
        run_cli("autoupdate", node.hostname)
    assert not UpdateRun.objects.exists()


@pytest.mark.django_db
def test_autoupdate_of_unknown_or_locked_node_is_refused(make_node, releases):
    with pytest.raises(CommandError, match="no node named 'nope'"):
        run_cli("autoupdate", "nope", "--yes")
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0")
    locks.set_lock(node, "earlier failure")
    with pytest.raises(CommandError, match="update lock"):
        run_cli("autoupdate", node.hostname, "--yes")
    assert not UpdateRun.objects.exists()


@pytest.mark.django_db
def test_autoupdate_of_an_up_to_date_node_says_no_updates_available(make_node, releases):
    node = make_node("gw", version="2.2.0")
    Node.objects.filter(pk=node.pk).update(installed_version="2.2.0")
    with pytest.raises(CommandError, match="no updates available"):
        run_cli("autoupdate", node.hostname, "--yes")


@pytest.fixture
def trio(make_node, releases):
    """A cluster of three nodes on 2.1.0, each with a user logged in."""
    cluster = Cluster.objects.create(name=f"trio{next(_trios)}", max_parallel_updates=1)
    nodes = [make_node("t", cluster=cluster, users=(f"user{i}",)) for i in range(3)]
    for i, node in enumerate(nodes):
        Node.objects.filter(pk=node.pk).update(installed_version="2.1.0", logged_in_users=[f"user{i}"])
    return cluster, nodes


@pytest.mark.django_db
def test_autoupdate_of_a_cluster_without_yes_names_every_nodes_users_and_starts_nothing(trio):
    cluster, nodes = trio
    with pytest.raises(CommandError) as refused:
        run_cli("autoupdate", "--cluster", cluster.name)
    assert all(f"{node}: user{i}" in str(refused.value) for i, node in enumerate(nodes))
    assert not UpdateRun.objects.exists()


@pytest.mark.django_db
def test_autoupdate_of_a_cluster_starts_the_nodes_that_may_and_names_the_others(
    trio, django_capture_on_commit_callbacks
):
    cluster, nodes = trio
    locks.set_lock(nodes[1], "earlier failure")
    out, err = StringIO(), StringIO()
    with django_capture_on_commit_callbacks(execute=False), pytest.raises(CommandError, match="1 of 3 node"):
        call_command("autoupdate", "--cluster", cluster.name, "--yes", stdout=out, stderr=err)
    assert set(UpdateRun.objects.values_list("node", flat=True)) == {nodes[0].pk, nodes[2].pk}
    assert f"not started: {nodes[1]} has an update lock (earlier failure)" in err.getvalue()
    assert f"{nodes[2]} 2.1.0 -> 2.2.0; logging off: user2" in out.getvalue()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "name at least one node, or a cluster"),
        (("--cluster", "nope"), "no cluster named 'nope'"),
        (("gw-nope", "gw-none"), "no node named 'gw-nope', no node named 'gw-none'"),
        (("--cluster", "empty"), "cluster 'empty' has no nodes"),
        (("--cluster", "empty", "--timeout", "0"), "--timeout must be a positive number"),
    ],
)
def test_autoupdate_with_bad_arguments_is_a_clear_error_and_starts_nothing(args, message):
    Cluster.objects.create(name="empty")
    with pytest.raises(CommandError, match=message):
        run_cli("autoupdate", *args)
    assert not UpdateRun.objects.exists()


@pytest.mark.django_db
def test_remove_update_lock_keeps_history_and_checks_the_user(make_node, staff):
    node = make_node("gw")
    locks.set_lock(node, "failed")
    viewer = staff("viewer")
    with pytest.raises(CommandError, match="may not remove update locks"):
        run_cli("remove_update_lock", node.hostname, "--user", viewer.username)
    operator = staff("op", "update")
    assert "removed" in run_cli("remove_update_lock", node.hostname, "--user", operator.username)
    lock = UpdateLock.objects.get(node=node)
    assert lock.removed_by == operator
    with pytest.raises(CommandError, match="has no update lock"):
        run_cli("remove_update_lock", node.hostname)


@pytest.mark.django_db
def test_demo_fleet_is_idempotent(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    settings.TGP_REPO_DIR = tmp_path / "repo"
    settings.TGP_NODE_STATE_DIR = tmp_path / "nodes"
    settings.TGP_REPO_KEYS_DIR = tmp_path / "keys" / "repo"
    settings.TGP_REPO_ROOT_FILE = tmp_path / "keys" / "repo-root.json"
    settings.TGP_REPO_METADATA_DIR = tmp_path / "tuf"
    run_cli("demo_fleet")
    run_cli("demo_fleet")
    assert sorted(Node.objects.values_list("hostname", flat=True)) == ["c1n1", "c1n2", "c1n3", "gw1"]
    assert Cluster.objects.get(name="cluster1").max_parallel_updates == 1
    assert UpdateSchedule.objects.filter(cluster__name="cluster1").count() == 1, "its plan shows from the start"
    assert Node.objects.get(hostname="gw1").cluster is None
    assert Release.objects.filter(channel="stable").count() >= 2
    assert Release.objects.filter(channel="oldstable").count() >= 1
    assert Node.objects.get(hostname="gw1").logged_in_users == ["alice", "bob"]
    from django.contrib.auth.models import User

    assert User.objects.filter(username="operator", groups__name="update").exists()
    assert User.objects.filter(username="maintainer", groups__name="maint").exists()


@pytest.mark.workflow
@pytest.mark.timeout(180)
@pytest.mark.django_db(transaction=True)
def test_autoupdate_wait_exits_zero_on_success_and_one_on_failure(demo_repo, make_node, agent_for, redis_url, tmp_path):
    repo, _ = demo_repo
    repo.import_releases()
    good, bad = make_node("gw"), make_node("gw")
    agent_for(good)
    agent_for(bad, root=repo.__class__(tmp_path / "other").root_file)  # pins another repository's root
    env = process_env(redis_url, DATABASE_URL=test_database_url())
    cmd = [sys.executable, "manage.py", "autoupdate", "--yes", "--wait", "--timeout", "90"]

    ok = subprocess.run([*cmd, good.hostname], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "succeeded" in ok.stdout and "alice, bob" in ok.stdout

    failed = subprocess.run([*cmd, bad.hostname], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert "failed" in failed.stderr and "download" in failed.stderr


@pytest.mark.workflow
@pytest.mark.timeout(180)
@pytest.mark.django_db(transaction=True)
def test_autoupdate_of_a_cluster_waits_for_every_node_within_its_cap(demo_repo, make_node, agent_for, redis_url):
    repo, _ = demo_repo
    repo.import_releases()
    cluster = Cluster.objects.create(name=f"pair{next(_trios)}", max_parallel_updates=1)
    nodes = [make_node("p", cluster=cluster) for _ in range(2)]
    for node in nodes:
        agent_for(node)
    env = process_env(redis_url, DATABASE_URL=test_database_url())
    cmd = [sys.executable, "manage.py", "autoupdate", "--cluster", cluster.name, "--yes", "--wait", "--timeout", "90"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(f"({node}) succeeded" in done.stdout for node in nodes)
    assert set(Node.objects.filter(cluster=cluster).values_list("installed_version", flat=True)) == {"2.2.0"}
