"""The repository's keys: show them, rotate a role's, re-sign the online roles, export the root."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from agent.shared.repository import RepositoryError
from updates.repository import ROLES, KeyDirs, Store, describe, export_root, resign_online, rotate_keys


def add_keys_dir_argument(parser: argparse.ArgumentParser) -> None:
    """--keys-dir, as build_repo and repo_keys take it (key_dirs)."""
    parser.add_argument(
        "--keys-dir",
        type=Path,
        default=None,
        help="where to look for role keys first, e.g. offline media (then TGP_REPO_KEYS_DIR); "
        "new keys are written here",
    )


def key_dirs(given: Path | None) -> tuple[Path, ...]:
    """Where the commands look for keys: --keys-dir first (the offline media), then TGP_REPO_KEYS_DIR."""
    online = Path(settings.TGP_REPO_KEYS_DIR)
    return (online,) if given is None or Path(given) == online else (Path(given), online)


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


class Command(BaseCommand):
    help = (
        "The update repository's signing keys (README, 'Repository keys'). show: roles, thresholds, "
        "keys and which are here. rotate ROLE: new keys for a role in a new root version (needs the "
        "root keys). resign: sign snapshot and timestamp again. export-root FILE: the root to pin."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--repo", type=Path, default=None, help="repository directory (default: TGP_REPO_DIR)")
        add_keys_dir_argument(parser)
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("show", help="roles, versions, expiry, thresholds, keys")
        rotate = sub.add_parser("rotate", help="new keys for ROLE in a new root version")
        rotate.add_argument("role", choices=ROLES)
        rotate.add_argument("--count", type=_count, default=1, help="how many new keys (default 1)")
        rotate.add_argument("--threshold", type=_count, default=None, help="signatures needed (default: as before)")
        rotate.add_argument("--keep-old", action="store_true", help="add the new keys, keep the old ones")
        resign = sub.add_parser("resign", help="sign snapshot and timestamp again (the beat does this)")
        resign.add_argument("--force", action="store_true", help="even if they are far from expiring")
        export = sub.add_parser("export-root", help="write the current root, to pin on a node or control host")
        export.add_argument("file", type=Path)

    def handle(self, *args: Any, **opts: Any) -> None:
        repo: Path = opts["repo"] or settings.TGP_REPO_DIR
        keys_dir = key_dirs(opts["keys_dir"])
        try:
            getattr(self, "_" + opts["action"].replace("-", "_"))(repo, keys_dir, opts)
        except (RepositoryError, OSError) as exc:
            raise CommandError(str(exc)) from exc

    def _show(self, repo: Path, keys_dir: KeyDirs, opts: dict[str, Any]) -> None:
        for state in describe(repo, keys_dir):
            expires = state.expires.isoformat() if state.expires else "-"
            self.stdout.write(
                f"{state.role:<9} version {state.version or '-'}, expires {expires}, "
                f"threshold {state.threshold} of {len(state.keyids)} key(s), {len(state.here)} here"
            )
            for keyid in state.keyids:
                self.stdout.write(f"    {keyid} {'(here)' if keyid in state.here else '(not here)'}")
        # What `python -m agent enroll --repo-root` prints for the root a node pins.
        for path in Store(repo, keys_dir).root_files():
            self.stdout.write(f"{path.name}: sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}")

    def _rotate(self, repo: Path, keys_dir: tuple[Path, ...], opts: dict[str, Any]) -> None:
        role = opts["role"]
        root = rotate_keys(
            repo, keys_dir, role, count=opts["count"], threshold=opts["threshold"], keep_old=opts["keep_old"]
        )
        spec = root.roles[role]
        self.stdout.write(
            self.style.SUCCESS(
                f"root version {root.version}: {role} has {len(spec.keyids)} key(s), threshold {spec.threshold}; "
                f"new key files in {keys_dir[0]}"
            )
        )

    def _resign(self, repo: Path, keys_dir: KeyDirs, opts: dict[str, Any]) -> None:
        roles = resign_online(repo, keys_dir, force=opts["force"])
        self.stdout.write(f"signed again: {', '.join(roles)}" if roles else "nothing to sign again yet")

    def _export_root(self, repo: Path, keys_dir: KeyDirs, opts: dict[str, Any]) -> None:
        export_root(repo, opts["file"])
        self.stdout.write(f"root written to {opts['file']}")
