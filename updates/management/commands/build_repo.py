"""Publish the releases of a source tree as the repository's new TUF targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from agent.shared.repository import RepositoryError
from updates.demo import write_demo_sources
from updates.management.commands.repo_keys import add_keys_dir_argument, key_dirs
from updates.repository import build_repository, export_root, trusted_root


class Command(BaseCommand):
    help = (
        "Publish SOURCE/<channel>/<version>/<name>_<version>.tar.gz (+ optional release.json) as the "
        "repository OUT (TUF metadata in OUT/metadata, packages in OUT/targets). The first run makes "
        "the repository's root and one key per role in the keys directory; later runs need the targets, "
        "snapshot and timestamp keys there."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("source", type=Path, help="source tree (SOURCE/<channel>/<version>/...)")
        parser.add_argument("out", type=Path, help="output directory served to the nodes")
        add_keys_dir_argument(parser)
        parser.add_argument(
            "--pin-root",
            type=Path,
            default=None,
            help="write the root to pin here if there is none (default: TGP_REPO_ROOT_FILE)",
        )
        parser.add_argument("--demo", action="store_true", help="write demo package sources into SOURCE first")

    def handle(self, *args: Any, **opts: Any) -> None:
        source: Path = opts["source"]
        out: Path = opts["out"]
        keys_dir = key_dirs(opts["keys_dir"])
        pin: Path = opts["pin_root"] or settings.TGP_REPO_ROOT_FILE
        try:
            if opts["demo"]:
                write_demo_sources(source)
                self.stdout.write(f"Wrote demo package sources to {source}")
            index = build_repository(source, out, keys_dir)
            if not pin.exists():
                export_root(out, pin)
                self.stdout.write(self.style.WARNING(f"Pinned the repository's root in {pin}"))
        except (RepositoryError, OSError) as exc:
            raise CommandError(str(exc)) from exc
        packages = {p.file for r in index.releases for p in r.packages}
        self.stdout.write(
            self.style.SUCCESS(
                f"Published {out}: targets version {index.serial}, {len(index.releases)} releases, "
                f"{len(packages)} packages, targets expire {index.expires.isoformat()}"
            )
        )
        self.stdout.write(f"Root metadata to pin on nodes: {out / 'metadata'} ({len(trusted_root(out))} bytes)")
