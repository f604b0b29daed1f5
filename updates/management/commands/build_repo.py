"""Build and sign the update repository from a source tree."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from updates.demo import write_demo_sources
from updates.repository import RepositoryError, build_repository, generate_keypair, public_key_from_private


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


class Command(BaseCommand):
    help = (
        "Build a signed update repository: SOURCE/<channel>/<version>/<name>_<version>.tar.gz "
        "(+ optional release.json) -> OUT/index.json, OUT/index.json.sig, OUT/pool/."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("source", type=Path, help="source tree (SOURCE/<channel>/<version>/...)")
        parser.add_argument("out", type=Path, help="output directory served to the nodes")
        parser.add_argument(
            "--key", type=Path, default=None, help="Ed25519 signing key (default: TGP_REPO_SIGNING_KEY_FILE)"
        )
        parser.add_argument(
            "--pubkey",
            type=Path,
            default=None,
            help="where a newly generated public key is written "
            "(default: TGP_REPO_PUBKEY_FILE, or <key>.pub when --key is given)",
        )
        parser.add_argument("--expires-days", type=_positive_int, default=30, help="index validity (days)")
        parser.add_argument("--serial", type=_positive_int, default=None, help="explicit index serial")
        parser.add_argument("--demo", action="store_true", help="write demo package sources into SOURCE first")

    def handle(self, *args: Any, **opts: Any) -> None:
        source: Path = opts["source"]
        out: Path = opts["out"]
        key, pubkey = self._key_paths(opts["key"], opts["pubkey"])
        try:
            if opts["demo"]:
                write_demo_sources(source)
                self.stdout.write(f"Wrote demo package sources to {source}")
            public_b64 = self._ensure_key(key, pubkey)
            index = build_repository(
                source, out, key, expires_in=timedelta(days=opts["expires_days"]), serial=opts["serial"]
            )
        except (RepositoryError, OSError) as exc:
            raise CommandError(str(exc)) from exc
        packages = {p.file for r in index.releases for p in r.packages}
        self.stdout.write(
            self.style.SUCCESS(
                f"Built repository {out}: serial {index.serial}, {len(index.releases)} releases, "
                f"{len(packages)} packages, expires {index.expires.isoformat()}"
            )
        )
        self.stdout.write(f"Public key: {public_b64}")

    def _key_paths(self, key: Path | None, pubkey: Path | None) -> tuple[Path, Path]:
        if key is None:
            return Path(settings.TGP_REPO_SIGNING_KEY_FILE), pubkey or Path(settings.TGP_REPO_PUBKEY_FILE)
        return key, pubkey or key.with_name(key.name + ".pub")

    def _ensure_key(self, key: Path, pubkey: Path) -> str:
        if key.exists():
            return public_key_from_private(key)
        public_b64 = generate_keypair(key, pubkey)
        self.stdout.write(self.style.WARNING(f"Generated a new signing key {key}; public key written to {pubkey}"))
        return public_b64
