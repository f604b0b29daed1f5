"""Keep the Release and Package rows in step with the repository's TUF metadata."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agent.shared.repository import RepositoryIndex, metadata_dir_for, read_pinned_root, repo_client, trusted_index
from updates.models import Package, Release

# Per metadata file, as the agents' download timeout: the control plane fetches the same files.
TIMEOUT = 30.0


def last_serial() -> int:
    latest = Release.objects.order_by("-index_serial").values_list("index_serial", flat=True).first()
    return latest or 0


@transaction.atomic
def import_index(index: RepositoryIndex) -> tuple[int, int]:
    """Upsert every release of verified targets metadata; returns (created, updated). A
    known release they no longer list is marked withdrawn (never the newest, never
    installed); one they list again is withdrawn no longer."""
    created = updated = 0
    listed = [entry.version for entry in index.releases]
    withdrawn = Release.objects.exclude(version__in=listed).filter(withdrawn_at=None)
    withdrawn.update(withdrawn_at=timezone.now())
    for entry in index.releases:
        release, was_created = Release.objects.update_or_create(
            version=entry.version,
            defaults={
                "channel": entry.channel,
                "notes": entry.notes,
                "needs_reboot": entry.needs_reboot,
                "hotfix": entry.hotfix,
                "index_serial": index.serial,
                "withdrawn_at": None,
            },
        )
        created += was_created
        updated += not was_created
        release.packages.exclude(name__in=[p.name for p in entry.packages]).delete()
        for p in entry.packages:
            Package.objects.update_or_create(
                release=release,
                name=p.name,
                defaults={"version": p.version, "file": p.file, "size": p.size, "sha256": p.sha256},
            )
    return created, updated


def sync_from_url(url: str | None = None, *, only_if_newer: bool = False) -> RepositoryIndex:
    """Refresh the TUF metadata (as the agents do: rollback, freeze and mix-and-match
    refused) and import its releases. only_if_newer: skip the import when these targets
    were imported already (every publication raises their version): 500 schedules firing
    in the same minute then cost one import, not 500."""
    root = read_pinned_root(settings.TGP_REPO_ROOT_FILE)
    with repo_client(TIMEOUT) as client:
        index = trusted_index(
            metadata_dir_for(settings.TGP_REPO_METADATA_DIR, root), url or settings.TGP_REPO_URL, root, client=client
        )
    if not (only_if_newer and index.serial == last_serial()):
        import_index(index)
    return index
