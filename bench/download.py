"""3. Download: agent.download.download_package against curl, its memory, and resume.

- throughput: the same random file from the same loopback server, fetched by the
  agent's downloader (sha256 included; like curl and apt, no fsync: see
  agent/download.py) and by the baseline that must do the same work, measured in the
  same run: `curl URL | tee FILE | sha256sum` (issue 16: a downloader that hashes what
  it writes is limited by the slower of the transfer and sha256, and bare curl can be
  faster than sha256 itself). Alternately, best of five each; target: downloader >=
  0.9 x the baseline. Bare curl and the medians are reported, without a target.
- memory: peak RSS of a process that only runs the downloader, for a 100 MB and a
  full-size file; target: it does not grow with the file (<= 8 MiB apart).
- resume: the server cuts the first connection at 50 %; the next call must resume
  with a Range request and re-fetch at most one chunk (1 MiB).

Random bytes, so no compression or sparse-file shortcut helps anybody. The files
live in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from bench.common import ROOT, metric
from bench.fileserver import FileServer

OPTIONS = {"size"}
MB = 1024 * 1024
CHUNK = 1024 * 1024  # settings.TGP_DOWNLOAD_CHUNK's default; the agent passes it as chunk_size
REPS = 5  # best of five, medians reported too: see the docstring
MEMORY_SLACK = 8 * MB


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        for _ in range(0, size, 8 * MB):
            block = os.urandom(min(8 * MB, size - fh.tell()))
            fh.write(block)
            digest.update(block)
    return digest.hexdigest()


def clean(dest: Path) -> None:
    dest.unlink(missing_ok=True)
    dest.with_name(dest.name + ".part").unlink(missing_ok=True)


def time_curl(url: str, dest: Path) -> float:
    clean(dest)
    started = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "-o", str(dest), url], check=True)
    return time.perf_counter() - started


def time_baseline(url: str, dest: Path) -> float:
    """The same work as the downloader's, by the usual tools: fetch, write and hash."""
    clean(dest)
    started = time.perf_counter()
    subprocess.run(
        f"curl -sS --fail {shlex.quote(url)} | tee {shlex.quote(str(dest))} | sha256sum",
        shell=True, check=True, stdout=subprocess.DEVNULL, executable="/bin/bash",
    )  # fmt: skip
    return time.perf_counter() - started


def time_sha256sum(path: Path) -> float:
    """curl leaves the hash check to somebody else: what `sha256sum` adds to it."""
    started = time.perf_counter()
    subprocess.run(["sha256sum", str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def time_downloader(url: str, dest: Path, size: int, sha256: str) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of a child process that runs the downloader once."""
    clean(dest)
    cmd = [sys.executable, "-m", "bench.download", url, str(dest), str(size), sha256]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = proc.stdout.read()
    # wait4: the rusage of this one child (RUSAGE_CHILDREN would mix in curl).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"downloader child exited with {proc.returncode}")
    return json.loads(out)["seconds"], usage.ru_maxrss * 1024


def child_main(url: str, dest: str, size: str, sha256: str) -> None:
    import httpx

    from agent.download import download_package

    started = time.perf_counter()
    # The agent's client: see agent/steps.py: download (TGP_DOWNLOAD_TIMEOUT's default).
    with httpx.Client(timeout=30.0, follow_redirects=False) as client:
        download_package(client, url, Path(dest), size=int(size), sha256=sha256, chunk_size=CHUNK)
    print(json.dumps({"seconds": time.perf_counter() - started}))


def throughput(server: FileServer, name: str, dest: Path, size: int, sha256: str) -> dict[str, Any]:
    url = server.url + name
    curl, hashed, piped, dl, rss = [], [], [], [], []
    for _ in range(REPS):  # alternate, so a warm page cache favours neither
        curl.append(time_curl(url, dest))
        hashed.append(curl[-1] + time_sha256sum(dest))
        piped.append(time_baseline(url, dest))
        seconds, peak = time_downloader(url, dest, size, sha256)
        dl.append(seconds)
        rss.append(peak)
    clean(dest)
    return {
        "curl_s": min(curl),
        "curl_sha256sum_s": min(hashed),
        "baseline_s": min(piped),
        "downloader_s": min(dl),
        "peak_rss": max(rss),
        "size": size,
        "every_rep_mb_s": {
            "curl": [round(size / MB / s) for s in curl],
            "baseline": [round(size / MB / s) for s in piped],
            "downloader": [round(size / MB / s) for s in dl],
        },
    }


def resume(server: FileServer, name: str, dest: Path, size: int, sha256: str) -> dict[str, Any]:
    import httpx

    from agent.download import download_package
    from agent.shared.repository import DownloadError

    clean(dest)
    server.behaviour.log.clear()
    server.behaviour.cut_after = size // 2
    with httpx.Client(timeout=30.0) as client:
        try:
            download_package(client, server.url + name, dest, size=size, sha256=sha256, chunk_size=CHUNK)
            raise RuntimeError("the cut connection did not fail the first attempt")
        except DownloadError:
            kept = dest.with_name(dest.name + ".part").stat().st_size
        download_package(client, server.url + name, dest, size=size, sha256=sha256, chunk_size=CHUNK)
    first, *rest = server.behaviour.log
    after_cut = sum(s.sent for s in rest)
    clean(dest)
    return {
        "cut_at": first.sent,
        "kept_in_part": kept,
        "resume_range": rest[0].range if rest else None,
        "requests_after_cut": len(rest),
        "bytes_after_cut": after_cut,
        "refetched": first.sent + after_cut - size,
    }


def run(size: int = 500) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tgp-bench-download-"))
    try:
        return measure(work, size * MB)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(work: Path, size: int) -> dict[str, Any]:
    files = work / "files"
    files.mkdir()
    small = min(100 * MB, size)
    sums = {"big.bin": make_file(files / "big.bin", size), "small.bin": make_file(files / "small.bin", small)}
    dest = work / "dest" / "pkg.bin"
    dest.parent.mkdir()
    with FileServer(files) as server:
        big = throughput(server, "big.bin", dest, size, sums["big.bin"])
        little = throughput(server, "small.bin", dest, small, sums["small.bin"])
        cut = resume(server, "big.bin", dest, size, sums["big.bin"])
    return report(big, little, cut, size)


def report(big: dict[str, Any], little: dict[str, Any], cut: dict[str, Any], size: int) -> dict[str, Any]:
    ratio = big["baseline_s"] / big["downloader_s"]
    reps = big["every_rep_mb_s"]
    growth = big["peak_rss"] - little["peak_rss"]
    resumed = cut["resume_range"] == f"bytes={cut['kept_in_part']}-" and cut["requests_after_cut"] == 1
    mb = size // MB
    return {
        "name": "download",
        "metrics": [
            metric(f"baseline curl | tee | sha256sum {mb} MB", size / MB / big["baseline_s"], "MB/s"),
            metric(f"downloader {mb} MB", size / MB / big["downloader_s"], "MB/s"),
            metric("throughput ratio downloader/baseline", ratio, "x", ">= 0.9", ratio >= 0.9),
            metric("ratio of the medians", median(reps["downloader"]) / median(reps["baseline"]), "x"),
            metric(f"bare curl {mb} MB (no hash)", size / MB / big["curl_s"], "MB/s"),
            metric("ratio downloader/bare curl", big["curl_s"] / big["downloader_s"], "x"),
            metric("ratio downloader/(curl, then sha256sum)", big["curl_sha256sum_s"] / big["downloader_s"], "x"),
            metric(f"peak RSS {little['size'] // MB} MB file", little["peak_rss"] / MB, "MiB"),
            metric(f"peak RSS {mb} MB file", big["peak_rss"] / MB, "MiB"),
            metric("peak RSS growth", growth / MB, "MiB", "<= 8", growth <= MEMORY_SLACK),
            metric(
                "re-fetched after cut at 50%",
                cut["refetched"],
                "bytes",
                "<= 1 chunk (1 MiB)",
                resumed and 0 <= cut["refetched"] <= CHUNK,
            ),
        ],  # fmt: skip
        "details": {"big": big, "small": little, "resume": cut, "chunk": CHUNK, "reps": REPS},
    }


if __name__ == "__main__":
    child_main(*sys.argv[1:5])
