"""The protocol between the control plane and the node agents.

Names (queues, tasks, steps, priorities), the rules for versions and names, and
the messages that cross the broker, each a frozen dataclass with one codec:
``to_wire()`` gives the JSON-ready dict that Celery's JSON serializer sends, and
``from_wire()`` checks every field of what arrived and raises ProtocolError with
a message that names the field. A message with a field this side does not know
is refused too: both sides of a deployment run the same protocol.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Self
from zoneinfo import ZoneInfo

# --- names -----------------------------------------------------------------------

CONTROL_QUEUE = "control"
NODE_QUEUE_PREFIX = "node."
# The supervisors' heartbeats: a plain Redis list (RPUSH by the nodes, taken in batches by
# `manage.py heartbeats`), not a Celery queue. At 10,000 nodes a heartbeat is two thirds of
# all control messages, and a Celery task each cost the control worker's consumer more
# than the heartbeat's own work (docs/performance.md, section 6).
HEARTBEATS = "heartbeats"
# A heartbeat is a few hundred bytes; anything far larger is refused unread.
HEARTBEAT_MAX_BYTES = 64 * 1024

# The steps a node's agent carries out, and those the control plane does itself.
NODE_STEPS = ("notify", "exclude", "drain", "download", "install", "reboot", "resume")
CONTROL_STEPS = ("leave", "hold", "slot", "verify")
STEP_EVENTS = ("started", "progress", "succeeded", "skipped", "failed")

# Control-queue tasks that agents send or chains name.
RECORD_STEP = "control.record_step"
NODE_REPORT = "control.node_report"
ENROLL = "control.enroll"
VERIFY = "control.verify"
COMPLETE = "control.complete"
# Node-queue tasks outside a run.
ANNOUNCE = "node.announce"
END_MAINTENANCE = "node.end_maintenance"

# Redis serves priority 0 (the default) first, 9 last. Reports and slot requests
# yield to the chains' own control steps of nodes that are out of service; an agent
# worker's ready report goes first: after a reboot, verify waits for it. (A node that
# held its users until its planned time asks for its slot at the default priority:
# updates/runs/chains.py, build_chain.)
REPORT_PRIORITY = 9
READY_PRIORITY = 0
SLOT_PRIORITY = 9
# The outcome of a node step that no task of its chain follows (the chain ends there, as
# a scheduled run's download does, or the step failed) is the run's hand-off back to the
# control plane: it goes at the chain steps' own priority, not behind every report. At a
# schedule's update time a run whose download ended just before is carried on by that
# report, and a failure frees its slot with it (agent/tasks.py, NodeStep.after_return).
HANDOFF_PRIORITY = 0

# Publishing (step reports, a chain's next task) survives a broker restart of up to
# about a minute instead of failing the step.
PUBLISH_RETRY_POLICY = {"max_retries": 40, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}

# A scheduled cluster node's drain may come ahead of its users' time (StepCommand.at):
# the control plane takes a free update slot up to TGP_DRAIN_AHEAD before it, and the
# node logs its users off at that time by its own clock. It waits at most this long: a
# time further off is a wrong clock, not a plan (tgpadmin.E002 keeps the lead below it).
LONGEST_LOGOFF_WAIT = 600.0


# Who signs what (agent.shared.signing): the control plane its commands, each node
# its reports and the hand-offs of its steps, with its own key.
CONTROL_SIGNER = "control"
COMMAND_KINDS = ("step", "notice", "end_maintenance", "go")
NODE_KINDS = ("report", "node_report", "done", "enroll")


def node_queue(hostname: str) -> str:
    """The Celery queue this node's agent consumes, and nobody else."""
    return NODE_QUEUE_PREFIX + hostname


def node_task(step: str) -> str:
    return f"node.{step}"


def control_task(step: str) -> str:
    return f"control.{step}"


# --- names and versions ----------------------------------------------------------

# \Z, not $: "$" also matches before a trailing newline, and "gw1\n" is no host name.
HOSTNAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
VERSION_RE = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9}){0,3}\Z")
PACKAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.+-]{1,62}\Z")
SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
CHANNELS = ("stable", "oldstable")

HOSTNAME_RULE = "a host name: lower-case letters, digits and hyphens, at most 63 characters"
VERSION_RULE = "a dotted numeric version such as 2.1.0 (at most four parts of at most nine digits)"
PACKAGE_NAME_RULE = "a Debian package name: lower-case letters, digits, '.', '+', '-'"


def version_key(version: str) -> tuple[int, ...]:
    """The order of versions: '2.10.0' after '2.9.1', '2.1.0.3' after '2.1.0'."""
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in version.split("."))


def version_sort_key(version: str) -> str:
    """version_key as a string a database sorts the same way (every part has at most nine digits)."""
    return ".".join(f"{part:09d}" for part in version_key(version))


# --- the cluster cap's keys, which the agent's fencing check reads -----------------

SLOT_PREFIX = "tgp:slots"
# The places out of the load balancer (a second semaphore, control plane only: no fencing check reads it).
OUT_PREFIX = "tgp:out"


def slot_keys(cluster: str, prefix: str = SLOT_PREFIX) -> tuple[str, str]:
    """The hash of holders (node -> "<token>:<since epoch ms>") and the fencing counter.
    The braces are a Redis Cluster hash tag: one script may touch both keys."""
    if not cluster:
        raise ValueError("the cluster name must not be empty")
    base = f"{prefix}:{{{cluster}}}"
    return f"{base}:holders", f"{base}:fence"


def parse_slot_holder(value: bytes | str) -> tuple[int, int]:
    """(fencing token, since in epoch milliseconds) of one holder's entry."""
    text = value.decode() if isinstance(value, bytes) else value
    token, since_ms = text.split(":", 1)
    return int(token), int(since_ms)


# --- messages --------------------------------------------------------------------

MAX_TEXT = 4000
MAX_ITEMS = 10_000
_ID_RE = re.compile(r"^[A-Za-z0-9-]{0,64}\Z")
_USER_RE = re.compile(r"^[^\x00-\x1f]{1,256}\Z")
_NOTICE_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{0,100}\Z")


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text names the field."""


class _Fields:
    """Typed, bounded reads of one message's fields, with errors that name them."""

    def __init__(self, data: Any, what: str, known: set[str]) -> None:
        if not isinstance(data, Mapping):
            raise ProtocolError(f"{what}: expected an object, got {type(data).__name__}")
        unknown = set(data) - known
        if unknown:
            raise ProtocolError(f"{what}: unexpected field(s) {', '.join(sorted(map(str, unknown)))}")
        self.data, self.what = data, what

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.data or (optional and self.data[key] is None):
            if optional:
                return None
            raise ProtocolError(f"{self.what}: missing field {key!r}")
        return self.data[key]

    def _fail(self, key: str, rule: str) -> ProtocolError:
        return ProtocolError(f"{self.what}: {key}={self.data.get(key)!r} is not {rule}")

    def integer(self, key: str, minimum: int = 0, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None:
            return None
        # bool is a subclass of int: a run id of `true` is a broken message.
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self._fail(key, f"an integer >= {minimum}")
        return value

    def number(self, key: str, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise self._fail(key, "a time in epoch seconds")
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self._get(key, False)
        if not isinstance(value, bool):
            raise self._fail(key, "true or false")
        return value

    def text(self, key: str, pattern: re.Pattern[str] | None = None, rule: str = "", optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None:
            return None
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise self._fail(key, f"a text of at most {MAX_TEXT} characters")
        if pattern is not None and not pattern.match(value):
            raise self._fail(key, rule)
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self._get(key, False)
        if value not in choices:
            raise self._fail(key, f"one of {', '.join(choices)}")
        return str(value)

    def names(self, key: str, pattern: re.Pattern[str], rule: str) -> tuple[str, ...]:
        value = self._get(key, False)
        if not isinstance(value, list | tuple) or len(value) > MAX_ITEMS:
            raise self._fail(key, f"a list of at most {MAX_ITEMS} names")
        for item in value:
            if not isinstance(item, str) or not pattern.match(item):
                raise ProtocolError(f"{self.what}: {key} holds {item!r}, which is not {rule}")
        return tuple(value)

    def versions(self, key: str) -> dict[str, str]:
        value = self._get(key, False)
        if not isinstance(value, Mapping) or len(value) > MAX_ITEMS:
            raise self._fail(key, f"an object of at most {MAX_ITEMS} packages")
        for name, version in value.items():
            if not isinstance(name, str) or not PACKAGE_NAME_RE.match(name):
                raise ProtocolError(f"{self.what}: {key} names {name!r}, which is not {PACKAGE_NAME_RULE}")
            if not isinstance(version, str) or not VERSION_RE.match(version):
                raise ProtocolError(f"{self.what}: {key}[{name!r}]={version!r} is not {VERSION_RULE}")
        return dict(value)


def _known(cls: type) -> set[str]:
    return set(cls.__dataclass_fields__)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class StepCommand:
    """What a node step needs (the payload of every node.<step> task). Package sizes
    and hashes are not here on purpose: the agent takes them from the TUF targets metadata it verified."""

    run: int
    node: str
    version: str
    packages: tuple[str, ...] = ()
    message: str = ""
    cluster: str | None = None
    fence: int | None = None
    # An operator's catch-up from Oldstable: the only run that may install an older release.
    catchup: bool = False
    # When the node's users are logged off (epoch seconds), for the notice: the agent
    # writes it in the appliance's own time zone (render_notice). None: right away.
    at: float | None = None

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "packages": list(self.packages)}

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        f = _Fields(data, "step command", _known(cls))
        return cls(
            run=f.integer("run", minimum=1),
            node=f.text("node", HOSTNAME_RE, HOSTNAME_RULE),
            version=f.text("version", VERSION_RE, VERSION_RULE),
            packages=f.names("packages", PACKAGE_NAME_RE, PACKAGE_NAME_RULE),
            message=f.text("message"),
            cluster=f.text("cluster", HOSTNAME_RE, HOSTNAME_RULE, optional=True),
            fence=f.integer("fence", minimum=1, optional=True),
            catchup=f.boolean("catchup"),
            at=f.number("at", optional=True),
        )


@dataclass(frozen=True)
class Snapshot:
    """What an agent says about its appliance. `taken_at` is the node's clock when it
    read the state; `worker` says that the agent's worker (which consumes) took it."""

    installed_version: str = ""
    packages: dict[str, str] = field(default_factory=dict)
    users: tuple[str, ...] = ()
    logon_enabled: bool = True
    in_load_balancer: bool = False
    maintenance: bool = False
    boot_id: str = ""
    agent_instance: str = ""
    worker: bool = False
    taken_at: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "users": list(self.users)}

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        f = _Fields(data, "snapshot", _known(cls))
        installed = f.text("installed_version")
        if installed and not VERSION_RE.match(installed):
            raise ProtocolError(f"snapshot: installed_version={installed!r} is not {VERSION_RULE}")
        return cls(
            installed_version=installed,
            packages=f.versions("packages"),
            users=f.names("users", _USER_RE, "a user name"),
            logon_enabled=f.boolean("logon_enabled"),
            in_load_balancer=f.boolean("in_load_balancer"),
            maintenance=f.boolean("maintenance"),
            boot_id=f.text("boot_id", _ID_RE, "an id of letters, digits and hyphens"),
            agent_instance=f.text("agent_instance", _ID_RE, "an id of letters, digits and hyphens"),
            worker=f.boolean("worker"),
            taken_at=f.number("taken_at"),
        )


@dataclass(frozen=True)
class StepReport:
    """One event of a node step (control.record_step). `at` is when it happened on the
    node; `started` comes with the outcome of a step that never announced its start;
    only an outcome carries a snapshot."""

    run: int
    step: str
    event: str
    hostname: str
    at: float
    started: float | None = None
    detail: str = ""
    bytes_done: int | None = None
    bytes_total: int | None = None
    snapshot: Snapshot | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["snapshot"] = self.snapshot.to_wire() if self.snapshot else None
        return wire

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        f = _Fields(data, "step report", _known(cls))
        snapshot = f._get("snapshot", optional=True)
        return cls(
            run=f.integer("run", minimum=1),
            step=f.choice("step", NODE_STEPS),
            event=f.choice("event", STEP_EVENTS),
            hostname=f.text("hostname", HOSTNAME_RE, HOSTNAME_RULE),
            at=f.number("at"),
            started=f.number("started", optional=True),
            detail=f.text("detail"),
            bytes_done=f.integer("bytes_done", optional=True),
            bytes_total=f.integer("bytes_total", optional=True),
            snapshot=None if snapshot is None else Snapshot.from_wire(snapshot),
        )


@dataclass(frozen=True)
class NodeReport:
    """A heartbeat of the agent's supervisor, or its worker's report that it consumes (control.node_report)."""

    hostname: str
    snapshot: Snapshot

    def to_wire(self) -> dict[str, Any]:
        return {"hostname": self.hostname, "snapshot": self.snapshot.to_wire()}

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        f = _Fields(data, "node report", _known(cls))
        return cls(
            hostname=f.text("hostname", HOSTNAME_RE, HOSTNAME_RULE),
            snapshot=Snapshot.from_wire(f._get("snapshot", optional=False)),
        )


@dataclass(frozen=True)
class NoticeCommand:
    """A maintenance notice ahead of time, or the end of maintenance mode (no run involved).
    With `withdraws`, the notice takes back an earlier one (its notice id): users are
    told, and users who log on later no longer get the earlier one."""

    node: str
    notice_id: str = ""
    message: str = ""
    # When the maintenance (or the update) begins, epoch seconds; see render_notice.
    at: float | None = None
    withdraws: str = ""

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        f = _Fields(data, "notice", _known(cls))
        return cls(
            node=f.text("node", HOSTNAME_RE, HOSTNAME_RULE),
            notice_id=f.text("notice_id", _NOTICE_ID_RE, "a notice id"),
            message=f.text("message"),
            at=f.number("at", optional=True),
            withdraws=f.text("withdraws", _NOTICE_ID_RE, "a notice id", optional=True) or "",
        )


# --- notices ---------------------------------------------------------------------

# Where a notice names its time: "you will be logged off {when}". The control plane
# sends an instant (epoch seconds); the agent writes it in the appliance's own time
# zone, the one its users read clocks in.
WHEN = "{when}"


def render_notice(
    message: str, at: float | None, time_zone: str, missing: str = "You will be logged off {when}."
) -> str:
    """The notice as users read it: {when} becomes "at 2026-12-06 03:00 CET" (or
    "shortly" without a time). A message without {when} that has a time gets
    `missing` appended: an operator's own text never hides the time."""
    when = "shortly" if at is None else "at " + format_time(at, time_zone)
    if WHEN in message:
        return message.replace(WHEN, when)
    return message if at is None else f"{message} ({missing.replace(WHEN, when)})"


def format_time(at: float, time_zone: str) -> str:
    return datetime.fromtimestamp(at, ZoneInfo(time_zone)).strftime("%Y-%m-%d %H:%M %Z")
