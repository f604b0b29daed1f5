from __future__ import annotations

import json
import time
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

    def deliver_notice(self, notice_id: str, message: str, at: float | None = None) -> int:
        """A maintenance notice ahead of time (maintenance begins `at`, epoch seconds);
        returns how many logged-in users got it. Users who log on before `at` get it too."""
        count = self.notify(notice_id, message)
        self.remember_notice(notice_id, message, at)
        return count

    def withdraw_notice(self, withdrawn_id: str, notice_id: str, message: str) -> int:
        """Take back an announced maintenance: `message` to every logged-in user, and
        users who log on later no longer get the announcement."""
        self.forget_notice(withdrawn_id)
        return 0

    # --- the current notice, which a user who logs on gets (see notice_at_logon) ---
    # Kept in the state directory (notice.json), where the appliance's logon can read it.

    @property
    def notice_file(self) -> Path:
        return self.state_dir / "notice.json"

    def current_notice(self) -> dict[str, Any] | None:
        """{id, message (as users read it), at (epoch seconds or None), maintenance}."""
        notice = read_json(self.notice_file, None)
        return notice if isinstance(notice, dict) else None

    def remember_notice(self, notice_id: str, message: str, at: float | None, *, maintenance: bool = False) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        notice = {"id": notice_id, "message": message, "at": at, "maintenance": maintenance}
        atomic_write(self.notice_file, json.dumps(notice).encode())

    def forget_notice(self, notice_id: str | None = None) -> None:
        """Forget the current notice (only if it is `notice_id`, when given)."""
        notice = self.current_notice()
        if notice is not None and (notice_id is None or notice.get("id") == notice_id):
            self.notice_file.unlink(missing_ok=True)


def notice_at_logon(
    notice: dict[str, Any] | None, maintenance: bool, now: float | None = None
) -> dict[str, Any] | None:
    """The notice a user who logs on now gets: the current one while the node is in
    maintenance mode, or an announcement whose time still lies ahead; else none (a
    plain announcement whose time has passed is history)."""
    if not notice:
        return None
    at = notice.get("at")
    ahead = isinstance(at, int | float) and (time.time() if now is None else now) < at
    return notice if maintenance or ahead else None


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
