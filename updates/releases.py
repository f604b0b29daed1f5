"""Keep the Release and Package rows in step with the signed repository index."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agent.shared.repository import RepositoryIndex, fetch_index, parse_and_verify, pinned_public_key
from updates.models import Package, Release


def public_key() -> str:
    return pinned_public_key(settings.TGP_REPO_PUBKEY, settings.TGP_REPO_PUBKEY_FILE)


def last_serial() -> int:
    latest = Release.objects.order_by("-index_serial").values_list("index_serial", flat=True).first()
    return latest or 0


@transaction.atomic
def import_index(index: RepositoryIndex) -> tuple[int, int]:
    """Upsert every release of a verified index; returns (created, updated). A known
    release the index no longer lists is marked withdrawn (never the newest, never
    installed); one it lists again is withdrawn no longer."""
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
    """Fetch, verify and import the index. only_if_newer: skip the import when this
    serial was imported already (every build of the repository raises the serial,
    so it is the very same index): 500 schedules firing in the same minute then
    cost one import, not 500."""
    known = last_serial()
    index, _, _ = fetch_index(url or settings.TGP_REPO_URL, public_key(), min_serial=known)
    if not (only_if_newer and index.serial == known):
        import_index(index)
    return index


def sync_from_dir() -> RepositoryIndex:
    """Import from the repository directory on this machine (the demo's)."""
    base = settings.TGP_REPO_DIR
    index = parse_and_verify(
        (base / "index.json").read_bytes(),
        (base / "index.json.sig").read_bytes(),
        public_key(),
        min_serial=last_serial(),
    )
    import_index(index)
    return index
