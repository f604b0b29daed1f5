"""Driver for real hosts: each step runs a command the operator configures.

Commands come from the agent's environment (TGP_SHELL_STATUS, _NOTIFY, _EXCLUDE, _DRAIN,
_INSTALL, _REBOOT, _RESUME, and optionally _MESSAGE) and get TGP_NODE, TGP_RUN, TGP_VERSION,
TGP_PACKAGE_DIR, TGP_PACKAGES, TGP_MESSAGE and TGP_NOTICE_FILE in their environment. STATUS
prints the node's snapshot as JSON. A command that exits non-zero fails the step.

TGP_NOTICE_FILE names the current maintenance notice (JSON: id, message as users read
it, at, maintenance), written at notify and at an announcement, removed at resume and
when an announcement is withdrawn: the appliance's logon shows it to a user who logs on
while maintenance mode is on, or before an announced maintenance (see
agent.drivers.base.notice_at_logon). MESSAGE, if set, tells logged-in users that an
announcement is withdrawn (without it they are not told; users who log on are not).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from agent.drivers.base import Driver, read_json
from agent.shared.files import atomic_write
from agent.shared.repository import PackageEntry

COMMAND_TIMEOUT = 3600


class ShellCommandError(RuntimeError):
    pass


class ShellDriver(Driver):
    def _run(self, step: str, **env: str) -> str:
        command = os.environ.get(f"TGP_SHELL_{step.upper()}", "")
        if not command:
            raise ShellCommandError(f"TGP_SHELL_{step.upper()} is not set on the agent of {self.hostname}")
        full_env = {**os.environ, "TGP_NODE": self.hostname, "TGP_NOTICE_FILE": str(self.notice_file), **env}
        proc = subprocess.run(
            shlex.split(command), env=full_env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
        if proc.returncode != 0:
            raise ShellCommandError(f"{step} command exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        return proc.stdout

    def snapshot(self) -> dict[str, Any]:
        data = json.loads(self._run("status") or "{}")
        boot = Path("/proc/sys/kernel/random/boot_id")
        data.setdefault("boot_id", boot.read_text().strip() if boot.exists() else "")
        return data

    def notify(self, notice_id: str, message: str) -> int:
        self.remember_notice(notice_id, message, None, maintenance=True)
        self._run("notify", TGP_MESSAGE=message, TGP_NOTICE=notice_id)
        return len(self.snapshot().get("users", []))

    def deliver_notice(self, notice_id: str, message: str, at: float | None = None) -> int:
        self._run("notify", TGP_MESSAGE=message, TGP_NOTICE=notice_id)
        self.remember_notice(notice_id, message, at)
        return len(self.snapshot().get("users", []))

    def withdraw_notice(self, withdrawn_id: str, notice_id: str, message: str) -> int:
        self.forget_notice(withdrawn_id)
        if not os.environ.get("TGP_SHELL_MESSAGE"):
            return 0
        self._run("message", TGP_MESSAGE=message, TGP_NOTICE=notice_id)
        return len(self.snapshot().get("users", []))

    def exclude(self) -> None:
        self._run("exclude")

    def drain(self, run_id: int) -> list[str]:
        users = list(self.snapshot().get("users", []))
        self._run("drain", TGP_RUN=str(run_id))
        return users

    def install(self, run_id: int, version: str, files: list[tuple[PackageEntry, Path]], full: bool) -> str:
        done = self.state_dir / "installs.json"
        installs = read_json(done, {})
        if str(run_id) in installs:
            return f"already installed by run {run_id}"
        package_dir = str(files[0][1].parent) if files else ""
        names = " ".join(entry.name for entry, _ in files)
        out = self._run(
            "install", TGP_RUN=str(run_id), TGP_VERSION=version, TGP_PACKAGE_DIR=package_dir, TGP_PACKAGES=names
        )
        installs[str(run_id)] = version
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(done, json.dumps(installs).encode())
        return out.strip()[-500:] or f"installed {len(files)} package(s)"

    def reboot(self, run_id: int) -> bool:
        marker = self.state_dir / "reboots.json"
        reboots = read_json(marker, {})
        boot = self.snapshot().get("boot_id", "")
        if reboots.get(str(run_id)) and reboots[str(run_id)] != boot:
            return False
        reboots[str(run_id)] = boot
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, json.dumps(reboots).encode())
        self._run("reboot", TGP_RUN=str(run_id))
        return True

    def resume(self) -> None:
        self._run("resume")
        self.forget_notice()
