"""A realistic stand-in for a TightGate-Pro appliance, kept in a directory.

state.json holds the logged-in sessions (each with an inbox of notices), the
logon switch, load-balancer membership, maintenance mode, installed packages and
the boot id. Installs unpack into releases/<run>-<version>/ and switch the
``current`` link atomically; the previous release stays for rollback.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import config
from agent.drivers.base import Driver, notice_at_logon
from agent.shared.files import atomic_write
from agent.shared.repository import PackageEntry

REBOOT_EXIT_CODE = 75


class LogonRefused(RuntimeError):
    """Logon is off on the appliance (drained for an update): nobody may log on."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class SimulatedDriver(Driver):
    simulates_reboot = True

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    def exists(self) -> bool:
        return self.state_file.exists()

    def seed(self, *, version: str, packages: dict[str, str], users: list[str], cluster: bool) -> bool:
        """Create the appliance if it does not exist yet; False if it did."""
        if self.exists():
            return False
        release_dir = self.state_dir / "releases" / f"0-{version}"
        for name, pkg_version in packages.items():
            (release_dir / name).mkdir(parents=True, exist_ok=True)
            (release_dir / name / "VERSION").write_text(pkg_version)
        self._switch_current(release_dir)
        state = {
            "boot_id": uuid.uuid4().hex,
            "installed_version": version,
            "packages": dict(packages),
            "sessions": {user: {"since": _now(), "inbox": []} for user in users},
            "logon_enabled": True,
            "cluster": cluster,
            "in_load_balancer": cluster,
            "maintenance": False,
            "logged_off": [],
            "installs": {},
            "reboots": {},
        }
        with self.state() as current:
            current.update(state)
        return True

    @contextmanager
    def state(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of state.json under a file lock."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
            yield data
            # Not synced: a simulated appliance, rewritten at every step (benchmarks run hundreds).
            atomic_write(self.state_file, json.dumps(data, indent=1, sort_keys=True).encode(), durable=False)

    def read(self) -> dict[str, Any]:
        """The state as it is: a shared lock, and nothing written back (state.json is
        replaced atomically, so this never sees half a write)."""
        if not self.state_file.exists():
            return {}
        with open(self.state_dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            return json.loads(self.state_file.read_text())

    def snapshot(self) -> dict[str, Any]:
        data = self.read()
        return {
            "installed_version": data.get("installed_version", ""),
            "packages": data.get("packages", {}),
            "users": sorted(data.get("sessions", {})),
            "logon_enabled": data.get("logon_enabled", True),
            "in_load_balancer": data.get("in_load_balancer", False),
            "maintenance": data.get("maintenance", False),
            "boot_id": data.get("boot_id", ""),
        }

    def notify(self, notice_id: str, message: str) -> int:
        with self.state() as data:
            data["maintenance"] = True
            # Users who log on while maintenance mode is on get it too (log_on).
            data["notice"] = {"id": notice_id, "message": message, "at": None, "maintenance": True}
            return self._deliver(data, notice_id, message)

    def deliver_notice(self, notice_id: str, message: str, at: float | None = None) -> int:
        # An announcement ahead of time: users are told, nothing else changes. Users who
        # log on before its time get it too; once maintenance mode is on, its own notice.
        with self.state() as data:
            current = data.get("notice") or {}
            if not (data.get("maintenance") and current.get("maintenance")):
                data["notice"] = {"id": notice_id, "message": message, "at": at, "maintenance": False}
            return self._deliver(data, notice_id, message)

    def withdraw_notice(self, withdrawn_id: str, notice_id: str, message: str) -> int:
        with self.state() as data:
            if (data.get("notice") or {}).get("id") == withdrawn_id:
                data.pop("notice")
            return self._deliver(data, notice_id, message)

    @staticmethod
    def _deliver(data: dict[str, Any], notice_id: str, message: str) -> int:
        """Into every session's inbox, once per notice id; returns how many sessions there are."""
        sessions = data.setdefault("sessions", {})
        for session in sessions.values():
            if all(n["id"] != notice_id for n in session["inbox"]):
                session["inbox"].append({"id": notice_id, "message": message, "at": _now()})
        return len(sessions)

    # The current notice lives in state.json, changed under the same lock as the sessions:
    # a user who logs on while a notice goes out gets it exactly once.
    def current_notice(self) -> dict[str, Any] | None:
        notice = self.read().get("notice")
        return notice if isinstance(notice, dict) else None

    def remember_notice(self, notice_id: str, message: str, at: float | None, *, maintenance: bool = False) -> None:
        with self.state() as data:
            data["notice"] = {"id": notice_id, "message": message, "at": at, "maintenance": maintenance}

    def forget_notice(self, notice_id: str | None = None) -> None:
        with self.state() as data:
            if data.get("notice") and (notice_id is None or data["notice"].get("id") == notice_id):
                data.pop("notice")

    def log_on(self, user: str) -> list[dict[str, Any]]:
        """A user logs on (a new session); returns the session's inbox. While the node is
        in maintenance mode, or a maintenance is announced, the session starts with the
        current notice. Refused (LogonRefused) while logon is off, as on the appliance."""
        with self.state() as data:
            if not data.get("logon_enabled", True):
                raise LogonRefused(f"logon is off on {self.hostname} (maintenance): {user} cannot log on")
            sessions = data.setdefault("sessions", {})
            if user in sessions:
                return list(sessions[user]["inbox"])
            notice = notice_at_logon(data.get("notice"), bool(data.get("maintenance")))
            inbox = [] if notice is None else [{"id": notice["id"], "message": notice["message"], "at": _now()}]
            sessions[user] = {"since": _now(), "inbox": inbox}
            return list(inbox)

    def exclude(self) -> None:
        with self.state() as data:
            data["in_load_balancer"] = False

    def drain(self, run_id: int) -> list[str]:
        self._pause()
        with self.state() as data:
            data["logon_enabled"] = False
            data["in_load_balancer"] = False
            sessions = data.get("sessions", {})
            users = sorted(sessions)
            for user in users:
                # What the user had been told before being logged off stays on record.
                record = {"user": user, "run": run_id, "at": _now(), "inbox": sessions[user]["inbox"]}
                data.setdefault("logged_off", []).append(record)
            data["sessions"] = {}
            return users

    def install(self, run_id: int, version: str, files: list[tuple[PackageEntry, Path]], full: bool) -> str:
        key = str(run_id)
        if key in self.read().get("installs", {}):
            return f"already installed by run {run_id}"
        self._pause()
        target = self.state_dir / "releases" / f"{run_id}-{version}"
        staging = target.with_name(target.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        current = self.state_dir / "current"
        changed = {entry.name for entry, _ in files}
        if not full and current.exists():
            # A partial update keeps every package it does not touch.
            for item in current.resolve().iterdir():
                if item.name not in changed:
                    shutil.copytree(item, staging / item.name, symlinks=True)
        for _entry, path in files:
            with tarfile.open(path, "r:gz") as tar:
                tar.extractall(staging, filter="data")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        self._switch_current(target)
        with self.state() as data:
            packages = {} if full else dict(data.get("packages", {}))
            packages.update({entry.name: entry.version for entry, _ in files})
            data["packages"] = packages
            if full:
                data["installed_version"] = version
            data.setdefault("installs", {})[key] = {"version": version, "at": _now(), "dir": target.name}
        return f"installed {len(files)} package(s) into {target.name}"

    def _switch_current(self, target: Path) -> None:
        # A new link renamed over the old one: the switch is atomic.
        link = self.state_dir / "current"
        tmp = self.state_dir / "current.new"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(target.relative_to(self.state_dir))
        os.replace(tmp, link)

    def _pause(self) -> None:
        """Real appliances take their time: TGP_SIM_STEP_SECONDS="min-max"."""
        spec = config().sim_step_seconds
        if spec:
            low, _, high = spec.partition("-")
            time.sleep(random.uniform(float(low), float(high or low)))

    def reboot(self, run_id: int) -> bool:
        self._pause()
        with self.state() as data:
            issued = data.setdefault("reboots", {}).get(str(run_id))
            if issued and issued != data.get("boot_id"):
                return False  # rebooted already for this run: never twice
            data["reboots"][str(run_id)] = data.get("boot_id")
            data["reboot_pending"] = True
        return True

    def complete_reboot(self) -> str:
        """Called by the agent supervisor when the worker exited for a reboot."""
        with self.state() as data:
            data["boot_id"] = uuid.uuid4().hex
            data["reboot_pending"] = False
            return data["boot_id"]

    def reboot_pending(self) -> bool:
        return bool(self.read().get("reboot_pending"))

    def resume(self) -> None:
        with self.state() as data:
            data["maintenance"] = False
            data.pop("notice", None)  # maintenance is over: nobody who logs on now is told of it
            data["logon_enabled"] = True
            data["in_load_balancer"] = bool(data.get("cluster"))
