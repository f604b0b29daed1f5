"""Demo package sources for a local repository (`build_repo --demo`).

Output is byte-for-byte deterministic, so re-running it changes nothing and a
rebuilt repository keeps the same package hashes.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from pathlib import Path

from agent.shared.files import atomic_write

# (channel, version, needs_reboot, hotfix, notes, {package: package version})
DEMO_RELEASES: list[tuple[str, str, bool, bool, str, dict[str, str]]] = [
    (
        "oldstable",
        "2.0.0",
        True,
        False,
        "Previous release line, security fixes only.",
        {"tgpro-base": "2.0.0", "tgpro-browser": "2.0.0", "tgpro-vnc": "2.0.0"},
    ),
    (
        "stable",
        "2.1.0",
        False,
        False,
        "New browser engine and VNC clipboard support.",
        {"tgpro-base": "2.1.0", "tgpro-browser": "2.1.0", "tgpro-vnc": "2.1.0"},
    ),
    (
        "stable",
        "2.2.0",
        True,
        False,
        "Kernel update (reboot required); base system unchanged.",
        {"tgpro-base": "2.1.0", "tgpro-browser": "2.2.0", "tgpro-vnc": "2.2.0"},
    ),
]


def write_demo_sources(source: Path, *, package_bytes: int = 256 * 1024) -> None:
    source = Path(source)
    for channel, version, needs_reboot, hotfix, notes, packages in DEMO_RELEASES:
        release_dir = source / channel / version
        release_dir.mkdir(parents=True, exist_ok=True)
        meta = {"notes": notes, "needs_reboot": needs_reboot, "hotfix": hotfix}
        _write_if_changed(release_dir / "release.json", json.dumps(meta, sort_keys=True, indent=1).encode())
        for name, pkg_version in packages.items():
            data = build_demo_package(name, pkg_version, package_bytes=package_bytes)
            _write_if_changed(release_dir / f"{name}_{pkg_version}.tar.gz", data)


def build_demo_package(name: str, version: str, *, package_bytes: int = 256 * 1024) -> bytes:
    """A real .tar.gz with <name>/VERSION and <name>/payload.bin."""
    payload = random.Random(f"{name}_{version}").randbytes(package_bytes)
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        _add_dir(tar, name)
        _add_file(tar, f"{name}/VERSION", f"{version}\n".encode())
        _add_file(tar, f"{name}/payload.bin", payload)
    gz_buf = io.BytesIO()
    # mtime=0 and no file name in the header keep the output deterministic.
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz_buf, compresslevel=1, mtime=0) as gz:
        gz.write(tar_buf.getvalue())
    return gz_buf.getvalue()


def _tarinfo(path: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _add_dir(tar: tarfile.TarFile, path: str) -> None:
    info = _tarinfo(path)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, path: str, data: bytes) -> None:
    info = _tarinfo(path)
    info.mode = 0o644
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write(path, data, durable=False)  # demo sources: rebuilt if lost
