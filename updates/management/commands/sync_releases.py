from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from updates.releases import sync_from_url
from updates.repository import RepositoryError


class Command(BaseCommand):
    help = "Fetch the signed index from TGP_REPO_URL (or --url), verify it and import its releases."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", default=None)

    def handle(self, *args: Any, url: str | None, **options: Any) -> None:
        try:
            index = sync_from_url(url)
        except (RepositoryError, OSError) as exc:
            raise CommandError(f"releases not imported: {exc}") from None
        self.stdout.write(f"index serial {index.serial}: {len(index.releases)} release(s) imported")
