from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from agent.shared.repository import RepositoryError
from updates.releases import sync_from_url


class Command(BaseCommand):
    help = (
        "Refresh the repository's TUF metadata from TGP_REPO_URL (or --url), verified against "
        "the pinned root (TGP_REPO_ROOT_FILE), and import its releases."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", default=None)

    def handle(self, *args: Any, url: str | None, **options: Any) -> None:
        try:
            index = sync_from_url(url)
        except (RepositoryError, OSError) as exc:
            raise CommandError(f"releases not imported: {exc}") from None
        self.stdout.write(f"targets version {index.serial}: {len(index.releases)} release(s) imported")
