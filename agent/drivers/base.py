from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from agent.shared.files import atomic_write
from agent.shared.repository import PackageEntry


class Driver(ABC):
    """One appliance as the agent sees it. Every method is safe to call twice
    for the same run: a redelivered step must not do its work again."""

    # True when the agent itself must go down to reboot (the simulated appliance).
    simulates_reboot = False

    def __init__(self, hostname: str, state_dir: Path) -> None:
        self.hostname = hostname
        self.state_dir = state_dir

    # Where downloads land; shared by all drivers because the agent downloads itself.
    def download_dir(self, version: str) -> Path:
        return self.state_dir / "downloads" / version

    def last_serial(self) -> int:
        path = self.state_dir / "index-serial"
        return int(path.read_text()) if path.exists() else 0

    def remember_serial(self, serial: int) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if serial > self.last_serial():
            atomic_write(self.state_dir / "index-serial", str(serial).encode())

    @abstractmethod
    def snapshot(self) -> dict[str, Any]:
        """installed_version, packages, users, logon_enabled, in_load_balancer, boot_id."""

    @abstractmethod
    def notify(self, notice_id: str, message: str) -> int:
        """Maintenance mode on and a notice to every logged-in user; returns how many got it."""

    @abstractmethod
    def exclude(self) -> None:
        """Out of the load balancer; logged-in users stay."""

    @abstractmethod
    def drain(self, run_id: int) -> list[str]:
        """Logon off, out of the load balancer, everybody logged off; returns who was logged off."""

    @abstractmethod
    def install(self, run_id: int, version: str, files: list[tuple[PackageEntry, Path]], full: bool) -> str:
        """Install the verified package files; returns a line for the run's page."""

    @abstractmethod
    def reboot(self, run_id: int) -> bool:
        """Reboot for this run unless already done; False if it was done already."""

    @abstractmethod
    def resume(self) -> None:
        """Maintenance off, logon on, back into the load balancer."""

    def deliver_notice(self, notice_id: str, message: str) -> int:
        return self.notify(notice_id, message)


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
