"""The node agent is a program of its own: it never imports Django or the control
side, the control side imports only its shared protocol, it runs as `python -m
agent`, and it refuses a message that does not follow the protocol before it
touches the appliance."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.shared.protocol import (
    NODE_STEPS,
    NoticeCommand,
    ProtocolError,
    Snapshot,
    StepCommand,
    StepReport,
    render_notice,
)
from tests.conftest import ROOT, process_env, wait_for

CONTROL_PACKAGES = ("tgpadmin", "nodes", "updates", "hotfixes")
FORBIDDEN_IN_AGENT = ("django", "celery_django", "django_celery_beat", *CONTROL_PACKAGES)


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def python_files(*packages: str) -> list[Path]:
    return [p for package in packages for p in (ROOT / package).rglob("*.py") if "migrations" not in p.parts]


def test_no_module_of_the_agent_imports_django_or_the_control_side():
    offending = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in python_files("agent")
        for name in imported_modules(path)
        if name.split(".")[0] in FORBIDDEN_IN_AGENT
    }
    assert not offending, offending
    assert len(python_files("agent")) > 10, "the scan reads the agent's modules"


def test_the_control_side_imports_only_the_agents_shared_package():
    offending = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in python_files(*CONTROL_PACKAGES)
        for name in imported_modules(path)
        if name.split(".")[0] == "agent" and not name.startswith("agent.shared")
    }
    assert not offending, offending


def test_no_process_role_is_switched_by_an_environment_variable_on_the_control_side():
    for path in python_files(*CONTROL_PACKAGES):
        assert "TGP_AGENT_NODE" not in path.read_text(), path


# Run as the agent's worker, in an interpreter where Django and the control side cannot be
# imported, as on an appliance that has neither: any import of them fails the worker.
WITHOUT_CONTROL_SIDE = """
import sys
from importlib.abc import MetaPathFinder

class Absent(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {forbidden!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on an appliance)", name=name)

sys.meta_path.insert(0, Absent())
from celery.__main__ import main
sys.argv = ["celery", *sys.argv[1:]]
main()
"""


def test_the_agents_worker_starts_where_django_and_the_control_side_cannot_be_imported(redis_url, tmp_path):
    # Django's settings module is in the environment on purpose: Celery loads its Django
    # fix-up (and Django) whenever it is, unless the app says otherwise.
    env = process_env(redis_url, TGP_AGENT_NODE="gw-import", TGP_NODE_STATE_DIR=str(tmp_path))
    env["DJANGO_SETTINGS_MODULE"] = "tgpadmin.settings"
    script = WITHOUT_CONTROL_SIDE.format(forbidden=set(FORBIDDEN_IN_AGENT))
    worker = [sys.executable, "-c", script, "-A", "agent.app", "worker", "-Q", "node.gw-import", "--pool", "solo"]
    worker += ["--without-gossip", "--without-mingle", "-n", "import@test", "-l", "INFO"]
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(worker, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "import@test ready." in log.read_text() or proc.poll() is not None, 60, "the worker")
    finally:
        proc.terminate()
        proc.wait(15)
    text = log.read_text()
    assert "import@test ready." in text, text[-3000:]
    assert ". node.drain" in text and ". node.install" in text, "the worker loaded the node tasks"
    assert ". control." not in text, "and none of the control plane's"


def run_agent_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], cwd=ROOT, env={**process_env("redis://127.0.0.1:1/0"), **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_agent_is_a_program_with_its_own_help():
    done = run_agent_cli("--help")
    assert done.returncode == 0 and "hostname" in done.stdout and "simulate" in done.stdout


def test_the_agent_refuses_a_hostile_node_name_and_a_bad_setting():
    done = run_agent_cli("../../etc")
    assert done.returncode == 2 and "host name" in done.stderr
    done = run_agent_cli("gw1", TGP_HEARTBEAT_INTERVAL="soon")
    assert done.returncode == 2 and "TGP_HEARTBEAT_INTERVAL='soon' is not a number" in done.stderr


# --- the protocol --------------------------------------------------------------------

GOOD = StepCommand(run=7, node="gw1", version="2.2.0", packages=("tgpro-base",), cluster="c1", fence=3)


def test_a_step_command_survives_the_wire():
    assert StepCommand.from_wire(GOOD.to_wire()) == GOOD


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("run", "7", "run='7' is not an integer >= 1"),
        ("run", True, "run=True is not an integer >= 1"),
        ("run", 0, "run=0 is not an integer >= 1"),
        ("version", "2.2.0; reboot", "is not a dotted numeric version"),
        ("version", "1234567890.0", "is not a dotted numeric version"),
        ("node", "../gw1", "is not a host name"),
        ("node", "gw1\n", "is not a host name"),
        ("version", "2.2.0\n", "is not a dotted numeric version"),
        ("packages", ["tgpro-base", "--force"], "'--force', which is not a Debian package name"),
        ("packages", "tgpro-base", "is not a list"),
        ("fence", -1, "fence=-1 is not an integer >= 1"),
        ("message", "x" * 5000, "is not a text of at most 4000"),
    ],
)
def test_a_step_command_with_a_bad_field_is_refused_naming_it(field, value, says):
    with pytest.raises(ProtocolError, match=says.replace("(", r"\(").replace("[", r"\[")):
        StepCommand.from_wire({**GOOD.to_wire(), field: value})


def test_a_step_command_with_a_missing_or_unknown_field_is_refused():
    wire = GOOD.to_wire()
    del wire["version"]
    with pytest.raises(ProtocolError, match="missing field 'version'"):
        StepCommand.from_wire(wire)
    with pytest.raises(ProtocolError, match="unexpected field"):
        StepCommand.from_wire({**GOOD.to_wire(), "sha256": "0" * 64})
    with pytest.raises(ProtocolError, match="expected an object"):
        StepCommand.from_wire([7, "gw1"])


def test_reports_and_snapshots_survive_the_wire_and_bad_ones_are_refused():
    snapshot = Snapshot(installed_version="2.2.0", packages={"tgpro-base": "2.2.0"}, users=("alice",), taken_at=1.5)
    report = StepReport(run=1, step="install", event="succeeded", hostname="gw1", at=2.0, snapshot=snapshot)
    assert StepReport.from_wire(report.to_wire()) == report
    with pytest.raises(ProtocolError, match="step='format'"):
        StepReport.from_wire({**report.to_wire(), "step": "format"})
    with pytest.raises(ProtocolError, match="installed_version"):
        Snapshot.from_wire({**snapshot.to_wire(), "installed_version": "latest"})
    with pytest.raises(ProtocolError, match="taken_at"):
        Snapshot.from_wire({**snapshot.to_wire(), "taken_at": float("nan")})
    assert set(NODE_STEPS) >= {"notify", "drain", "install"}


@pytest.mark.django_db
def test_the_control_plane_drops_a_report_that_does_not_follow_the_protocol(make_node):
    from nodes.models import Node
    from updates import tasks as control_tasks

    node = make_node("gw")
    report = {"hostname": node.hostname, "snapshot": {"installed_version": "9.9.9", "worker": "yes"}}
    control_tasks.node_report(report)
    assert Node.objects.get(pk=node.pk).installed_version == "", "nothing of it was stored"


# --- a real agent refuses before it touches the appliance -----------------------------


@pytest.fixture
def stopped_run(make_node, releases, agent_for):
    """A run of a node whose agent runs, with the run's own chain taken off the node's
    queue: the test sends the node's messages itself."""
    from nodes.models import Node
    from tgpadmin.celery import app
    from updates.runs import start

    node = make_node("gw")
    run = start.start_update(Node.objects.get(pk=node.pk), releases["2.2.0"])
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(node.queue)
    agent_for(node)
    return run


def send_drain(run, command: dict) -> None:
    from tgpadmin.celery import app

    app.send_task("node.drain", args=(command,), queue=run.node.queue)


def untouched(state_dir, hostname: str) -> bool:
    from agent.drivers.simulated import SimulatedDriver

    state = SimulatedDriver(hostname, state_dir / hostname).snapshot()
    return state["users"] == ["alice", "bob"] and state["logon_enabled"]


def agent_log(logs_dir, run) -> str:
    return (logs_dir / f"agent-{run.node.hostname}.log").read_text()


@pytest.mark.django_db(transaction=True)
@pytest.mark.workflow
@pytest.mark.timeout(120)
def test_the_agent_refuses_a_signed_command_with_a_bad_field_and_its_step_fails(stopped_run, state_dir):
    from updates import trust
    from updates.models import UpdateStep
    from updates.runs import chains

    bad = {**chains.node_payload(stopped_run), "version": "2.2.0 && reboot"}
    send_drain(stopped_run, trust.command("step", bad, step="drain"))
    drain = UpdateStep.objects.filter(run=stopped_run, name="drain")
    wait_for(lambda: drain.get().state == "failed", 30, "the refused drain to fail")
    assert "version='2.2.0 && reboot' is not a dotted numeric version" in drain.get().detail
    assert untouched(state_dir, stopped_run.node.hostname), "nobody was logged off"


@pytest.mark.django_db(transaction=True)
@pytest.mark.workflow
@pytest.mark.timeout(120)
def test_the_agent_refuses_what_the_control_plane_did_not_sign_for_it(stopped_run, make_node, state_dir, logs_dir):
    from agent.shared import signing
    from updates import trust
    from updates.runs import chains

    payload = chains.node_payload(stopped_run)
    other = make_node("gw")
    forged = signing.sign(trust.command("step", payload, step="drain")["body"], signing.Ed25519PrivateKey.generate())
    expired = trust.command("step", payload, step="drain")
    expired["body"]["expires"] = time.time() - 1
    expired = signing.sign(expired["body"], trust.control_key())  # signed, but out of date
    refusals = {
        "unsigned": (payload, "expected a signed envelope"),
        "signed by another key": (forged, "does not match its key"),
        "for another step": (trust.command("step", payload, step="reboot"), "a command for step 'reboot'"),
        "for another node": (
            trust.command("step", {**payload, "node": other.hostname}, step="drain"),
            f"a message for {other.hostname} reached the agent of {stopped_run.node.hostname}",
        ),
        "expired": (expired, "expired at"),
    }
    for what, (command, says) in refusals.items():
        send_drain(stopped_run, command)
        wait_for(lambda s=says: s in agent_log(logs_dir, stopped_run), 30, f"the refusal of a drain {what}")
    for hostname in (stopped_run.node.hostname, other.hostname):
        assert untouched(state_dir, hostname), "nobody was logged off on either node"


@pytest.mark.django_db(transaction=True)
@pytest.mark.workflow
@pytest.mark.timeout(120)
def test_a_command_the_node_carried_out_is_refused_when_it_comes_again(stopped_run, state_dir, logs_dir):
    from agent.drivers.simulated import SimulatedDriver
    from updates import trust
    from updates.models import UpdateStep
    from updates.runs import chains

    drain = trust.command("step", chains.node_payload(stopped_run), step="drain")
    send_drain(stopped_run, drain)
    step = UpdateStep.objects.filter(run=stopped_run, name="drain")
    wait_for(lambda: step.get().state == "succeeded", 30, "the drain")
    appliance = SimulatedDriver(stopped_run.node.hostname, state_dir / stopped_run.node.hostname)
    with appliance.state() as data:  # a user logs on again (logon is off: by hand, for the test)
        data["sessions"]["carol"] = {"since": "now", "inbox": []}
    send_drain(stopped_run, drain)  # the same message, recorded from the broker and sent again
    wait_for(lambda: "was carried out already: a replay" in agent_log(logs_dir, stopped_run), 30, "the refusal")
    assert "carol" in appliance.snapshot()["users"], "the replay logged nobody off"


def test_a_notice_names_its_time_in_the_appliances_own_zone():
    at = datetime(2026, 12, 6, 2, 0, tzinfo=UTC).timestamp()
    message = "Please save your work: you will be logged off {when}."
    assert render_notice(message, at, "Europe/Berlin") == (
        "Please save your work: you will be logged off at 2026-12-06 03:00 CET."
    )
    assert render_notice(message, at, "America/New_York").endswith("at 2026-12-05 21:00 EST.")
    assert render_notice(message, None, "Europe/Berlin").endswith("logged off shortly.")
    # An operator's own text without the placeholder still says when.
    assert render_notice("Update tonight", at, "Europe/Berlin") == (
        "Update tonight (You will be logged off at 2026-12-06 03:00 CET.)"
    )
    assert render_notice("Update now", None, "Europe/Berlin") == "Update now"


def test_a_notice_time_survives_the_wire_and_a_bad_one_is_refused():
    command = StepCommand(run=1, node="gw1", version="2.2.0", at=1_800_000_000.5)
    assert StepCommand.from_wire(command.to_wire()) == command
    notice = NoticeCommand(node="gw1", notice_id="notice-1", message="m", at=1_800_000_000.0)
    assert NoticeCommand.from_wire(notice.to_wire()) == notice
    with pytest.raises(ProtocolError, match="at="):
        NoticeCommand.from_wire({**notice.to_wire(), "at": "tomorrow"})
