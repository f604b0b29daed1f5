"""The Nagios sensor check_versions: exit codes from a real `manage.py` process,
texts and aggregation in-process, and a query count that does not grow with the fleet."""

from __future__ import annotations

import io
import subprocess
import sys
import uuid
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from nodes.models import Cluster, Node
from tests.conftest import ROOT, process_env, test_database_url
from updates import nagios
from updates.models import Release, UpdateLock

pytestmark = pytest.mark.timeout(120)

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


def name(prefix: str = "gw") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def add_releases() -> None:
    for version, channel in [("2.0.0", "oldstable"), ("2.0.1", "oldstable"), ("2.1.0", "stable"), ("2.2.0", "stable")]:
        Release.objects.create(version=version, channel=channel)


def add_node(hostname: str = "", *, version: str = "2.2.0", reported: bool = True, **fields: Any) -> Node:
    return Node.objects.create(
        hostname=hostname or name(),
        installed_version=version,
        last_seen=timezone.now() if reported else None,
        **fields,
    )


def lock(node: Node, reason: str = "Update to run 7 failed: install: dpkg error") -> UpdateLock:
    return UpdateLock.objects.create(node=node, reason=reason)


def run_in_process(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit:
        call_command("check_versions", *args, stdout=out)
    return exit.value.code, out.getvalue()  # type: ignore[return-value]


# --- exit codes, from the command as Nagios runs it ------------------------------


@pytest.fixture
def sensor(redis_url: str, transactional_db: Any):
    """Run `manage.py check_versions` in its own process on the test database."""
    env = process_env(redis_url, DATABASE_URL=test_database_url())

    def run(*args: str) -> tuple[int, str]:
        proc = subprocess.run(
            [sys.executable, "manage.py", "check_versions", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = proc.stdout.splitlines()
        assert len(lines) == 1, f"want one status line, got {proc.stdout!r} (stderr {proc.stderr!r})"
        return proc.returncode, lines[0]

    return run


def test_exit_critical_while_the_download_warning_is_set(sensor) -> None:
    add_releases()
    node = add_node(version="2.1.0", download_warning=True, download_warning_since=timezone.now())
    lock(node)  # the flag outranks the lock
    code, line = sensor(node.hostname)
    assert code == CRITICAL
    assert line == f"CHECK_VERSIONS CRITICAL - {node}: Update download failed | outdated=1 locked=1 download_failed=1"


def test_exit_warning_while_an_update_lock_is_set(sensor) -> None:
    add_releases()
    node = add_node(version="2.2.0")
    lock(node, "Update to run 7 failed: install: dpkg error")
    code, line = sensor(node.hostname)
    assert code == WARNING
    assert line.startswith(f"CHECK_VERSIONS WARNING - {node}: update lock active (Update to run 7 failed")
    assert line.endswith("| outdated=0 locked=1 download_failed=0")


def test_exit_warning_when_an_available_update_is_not_installed(sensor) -> None:
    add_releases()
    node = add_node(version="2.1.0")
    code, line = sensor(node.hostname)
    assert code == WARNING
    assert line == (
        f"CHECK_VERSIONS WARNING - {node}: runs 2.1.0, 2.2.0 (stable) is available"
        " | outdated=1 locked=0 download_failed=0"
    )


def test_exit_ok_on_the_newest_release(sensor) -> None:
    add_releases()
    node = add_node("gw1", version="2.2.0")
    UpdateLock.objects.create(node=node, reason="old", removed_at=timezone.now())  # history, not active
    assert sensor("gw1") == (
        OK,
        "CHECK_VERSIONS OK - gw1 runs 2.2.0, the newest stable release | outdated=0 locked=0 download_failed=0",
    )


def test_exit_unknown_for_an_unknown_node(sensor) -> None:
    assert sensor("no-such-node") == (UNKNOWN, "CHECK_VERSIONS UNKNOWN - no node named 'no-such-node'")


def test_exit_unknown_for_a_node_that_never_reported(sensor) -> None:
    add_releases()
    node = add_node(version="", reported=False)
    assert sensor(node.hostname) == (
        UNKNOWN,
        f"CHECK_VERSIONS UNKNOWN - {node} has never reported | outdated=0 locked=0 download_failed=0",
    )


@pytest.mark.parametrize(
    "args",
    [["gw1", "gw2"], ["gw1", "--cluster", "c1"], ["--no-such-option"], ["--cluster"]],
    ids=["two-nodes", "node-and-cluster", "unknown-option", "cluster-without-name"],
)
def test_exit_unknown_for_bad_arguments(sensor, args: list[str]) -> None:
    code, line = sensor(*args)
    assert code == UNKNOWN
    assert line.startswith("CHECK_VERSIONS UNKNOWN - bad arguments: ")


def test_exit_code_of_a_cluster_is_its_worst_node(sensor) -> None:
    add_releases()
    c1 = Cluster.objects.create(name=name("c"))
    add_node("gw1", cluster=c1)
    add_node("gw2", cluster=c1, version="2.1.0")
    add_node("gw3", download_warning=True)  # another cluster's trouble is not c1's
    code, line = sensor("--cluster", c1.name)
    assert (code, line) == (
        WARNING,
        f"CHECK_VERSIONS WARNING - cluster {c1}: gw2: runs 2.1.0, 2.2.0 (stable) is available"
        " | nodes=2 critical=0 warning=1 unknown=0 ok=1",
    )


def test_exit_code_without_arguments_is_the_worst_of_the_fleet(sensor) -> None:
    add_releases()
    add_node("gw1", download_warning=True)
    for host in ("gw2", "gw3", "gw4"):
        add_node(host)
    assert sensor() == (
        CRITICAL,
        "CHECK_VERSIONS CRITICAL - gw1: Update download failed | nodes=4 critical=1 warning=0 unknown=0 ok=3",
    )


# --- texts and aggregation, in-process --------------------------------------------


@pytest.mark.django_db
def test_in_process_the_command_also_prints_one_line_and_exits_with_the_code() -> None:
    add_releases()
    add_node("gw1", version="2.1.0")
    code, out = run_in_process("gw1")
    assert code == WARNING
    assert out.count("\n") == 1 and out.startswith("CHECK_VERSIONS WARNING - gw1: runs 2.1.0")


@pytest.mark.django_db
def test_bad_arguments_in_process_are_unknown(capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        call_command("check_versions", "gw1", "--cluster", "c1")
    assert exit.value.code == UNKNOWN
    assert capsys.readouterr().out.startswith("CHECK_VERSIONS UNKNOWN - bad arguments: ")


@pytest.mark.django_db
def test_a_failing_check_is_unknown_not_a_traceback(monkeypatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("database is gone")

    monkeypatch.setattr(nagios, "check_nodes", broken)
    assert run_in_process() == (UNKNOWN, "CHECK_VERSIONS UNKNOWN - check failed: RuntimeError: database is gone\n")


@pytest.mark.django_db
def test_lock_and_outdated_are_both_named_and_the_reason_cannot_break_the_line() -> None:
    add_releases()
    node = add_node("gw1", version="2.1.0")
    lock(node, "install failed | exit 1\nsee the log")
    code, line = nagios.check_node(node)
    assert code == WARNING
    assert line == (
        "CHECK_VERSIONS WARNING - gw1: update lock active (install failed / exit 1 see the log);"
        " runs 2.1.0, 2.2.0 (stable) is available | outdated=1 locked=1 download_failed=0"
    )


@pytest.mark.django_db
def test_a_long_lock_reason_is_shortened() -> None:
    add_releases()
    node = add_node("gw1")
    lock(node, "x" * 5000)
    code, line = nagios.check_node(node)
    assert code == WARNING and len(line) < 200 and "..." in line


@pytest.mark.django_db
def test_the_node_is_compared_with_its_own_channel() -> None:
    add_releases()
    on_old = add_node("gw1", version="2.0.1", channel="oldstable")
    behind_old = add_node("gw2", version="2.0.0", channel="oldstable")
    assert nagios.check_node(on_old) == (
        OK,
        "CHECK_VERSIONS OK - gw1 runs 2.0.1, the newest oldstable release | outdated=0 locked=0 download_failed=0",
    )
    assert nagios.check_node(behind_old).line.startswith(
        "CHECK_VERSIONS WARNING - gw2: runs 2.0.0, 2.0.1 (oldstable) is available"
    )


@pytest.mark.django_db
def test_a_version_other_than_the_newest_is_a_warning_even_if_higher() -> None:
    add_releases()
    node = add_node("gw1", version="2.10.0")  # numerically newer than 2.2.0, not a known release
    code, line = nagios.check_node(node)
    assert code == WARNING
    assert "gw1: runs 2.10.0, not the newest stable release 2.2.0" in line


@pytest.mark.django_db
def test_unknown_without_a_version_or_a_release_to_compare_with() -> None:
    node = add_node("gw1")
    assert nagios.check_node(node).line == (
        "CHECK_VERSIONS UNKNOWN - gw1: no stable release known to compare with | outdated=0 locked=0 download_failed=0"
    )
    add_releases()
    silent = add_node("gw2", version="")
    assert nagios.check_node(silent).code == UNKNOWN


@pytest.mark.django_db
def test_unknown_cluster_and_empty_cluster() -> None:
    Cluster.objects.create(name="empty")
    assert run_in_process("--cluster", "nope") == (UNKNOWN, "CHECK_VERSIONS UNKNOWN - no cluster named 'nope'\n")
    assert run_in_process("--cluster", "empty") == (UNKNOWN, "CHECK_VERSIONS UNKNOWN - no nodes in cluster empty\n")


@pytest.mark.django_db
def test_cluster_ok_line() -> None:
    add_releases()
    c1 = Cluster.objects.create(name="c1")
    add_node("gw1", cluster=c1)
    add_node("gw2", cluster=c1, version="2.0.1", channel="oldstable")
    assert run_in_process("--cluster", "c1") == (
        OK,
        "CHECK_VERSIONS OK - all 2 nodes of cluster c1 run the newest release of their channel"
        " | nodes=2 critical=0 warning=0 unknown=0 ok=2\n",
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("states", "worst"),
    [
        (["ok", "warning"], WARNING),
        (["ok", "warning", "unknown"], UNKNOWN),  # an unknown node may hide anything
        (["unknown", "warning", "critical", "ok"], CRITICAL),  # exit 2 even though UNKNOWN is 3
        (["ok", "ok"], OK),
    ],
)
def test_cluster_state_is_the_worst_node(states: list[str], worst: int) -> None:
    add_releases()
    c1 = Cluster.objects.create(name="c1")
    kinds = {
        "ok": {},
        "warning": {"version": "2.1.0"},
        "unknown": {"reported": False},
        "critical": {"download_warning": True},
    }
    for i, state in enumerate(states):
        add_node(f"gw{i}", cluster=c1, **kinds[state])
    code, line = nagios.check_nodes(Node.objects.filter(cluster=c1), scope="cluster c1")
    assert code == worst
    counts = {s: states.count(s) for s in ("critical", "warning", "unknown", "ok")}
    perf = " ".join(f"{k}={v}" for k, v in counts.items())
    assert line.endswith(f"| nodes={len(states)} {perf}")
    worst_state = {OK: "ok", WARNING: "warning", CRITICAL: "critical", UNKNOWN: "unknown"}[worst]
    for i, state in enumerate(states):
        if worst != OK:  # the OK line names no nodes, only the count
            assert (f"gw{i}" in line.split(" | ")[0]) == (state == worst_state), line


@pytest.mark.django_db
def test_the_fleet_line_names_at_most_five_nodes() -> None:
    add_releases()
    for i in range(8):
        add_node(f"gw{i}", download_warning=True)
    code, line = nagios.check_nodes(Node.objects.all())
    assert code == CRITICAL
    text = line.split(" | ")[0]
    assert text.count("Update download failed") == 5
    assert text.endswith("; and 3 more")
    assert line.endswith("| nodes=8 critical=8 warning=0 unknown=0 ok=0")


@pytest.mark.django_db
def test_check_nodes_also_takes_a_list() -> None:
    add_releases()
    a = add_node("gw1")
    b = add_node("gw2")
    lock(b)
    code, line = nagios.check_nodes([a, b])
    assert code == WARNING and "gw2: update lock active" in line


@pytest.mark.django_db
def test_exit_code_helper() -> None:
    assert nagios.exit_code(nagios.Result(2, "x")) == 2
    assert nagios.exit_code(nagios.Status.UNKNOWN) == 3


# --- queries ------------------------------------------------------------------------


def populate(count: int, cluster: Cluster) -> None:
    for i in range(count):
        node = add_node(cluster=cluster, version="2.1.0" if i % 3 else "2.2.0", channel=("stable", "oldstable")[i % 2])
        if i % 4 == 0:
            lock(node)
        if i % 5 == 0:
            UpdateLock.objects.create(node=node, reason="removed", removed_at=timezone.now())


def queries_for(*args: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        run_in_process(*args)
    return len(ctx.captured_queries)


@pytest.mark.django_db
def test_query_count_does_not_grow_with_the_number_of_nodes(django_assert_max_num_queries) -> None:
    add_releases()
    small, large = Cluster.objects.create(name="small"), Cluster.objects.create(name="large")
    populate(3, small)
    populate(40, large)
    assert queries_for("--cluster", "small") == queries_for("--cluster", "large")
    # The cluster, the nodes with their locks, the newest release of each channel.
    with django_assert_max_num_queries(4):
        code, _ = run_in_process("--cluster", "large")
    assert code == WARNING
    with django_assert_max_num_queries(3):
        run_in_process()
