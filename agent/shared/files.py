"""Files written whole or not at all, and hashed in bounded chunks."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_HASH_CHUNK = 1024 * 1024


def hash_file(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def atomic_write(dest: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace dest with data: never half a file. `durable`: synced to disk before
    the rename (what later checks trust); without it, a power cut may lose the new
    content but never leaves a torn file."""
    atomic_write_stream(dest, [data], durable=durable)


def atomic_write_stream(dest: Path, parts: Iterable[Any], *, durable: bool = True) -> None:
    """atomic_write of byte strings and readable files, in order."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                if isinstance(part, bytes):
                    fh.write(part)
                else:
                    shutil.copyfileobj(part, fh, _HASH_CHUNK)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
