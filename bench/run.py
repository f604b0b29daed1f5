"""Run the benchmarks, write var/bench/results.json and print a table.

    python bench/run.py                      # all of them
    python bench/run.py download admin       # some of them
    python bench/run.py download --size 100  # options go to the benchmarks that take them

Each benchmark runs in a process of its own: they set up Django on different
databases, and one must not inherit another's memory or Redis.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Issue order. None: the benchmark needs code that has not landed yet.
BENCHMARKS: dict[str, str | None] = {
    "rollout": "bench.rollout",  # 1. rollout makespan: 200 nodes, cap 10
    "rollout-x5": "bench.rollout_x5",  # 1, each install five times as long (5-15 s)
    "rollout-scheduled": "bench.rollout_scheduled",  # 1, as a time-controlled update of the cluster
    "orchestration": "bench.orchestration",  # 2. orchestration overhead per step
    "download": "bench.download",  # 3. download throughput, memory, resume
    "admin": "bench.admin_scale",  # 4. admin at scale
    "beat": "bench.beat_lag",  # 5. beat lag: 500 schedules due at once
    "fanout": "bench.fanout",  # 5b. a schedule's firing: a 200-node cluster, single systems
    "fleet": "bench.fleet",  # 6. fleet scale: heartbeats of 10,000 nodes, the knee
    "fleet-update": "bench.fleet_update",  # 6b. a fleet-wide time-controlled update due at one instant
}
NOT_YET: dict[str, str] = {}
RESULTS = ROOT / "var" / "bench" / "results.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--size", type=int, help="download: file size in MB (default 500)")
    parser.add_argument("--runs", type=int, help="orchestration: number of Auto-Update runs (default 24)")
    parser.add_argument(
        "--nodes",
        type=int,
        help="admin, fleet: fleet size (default 10000); fleet-update: fleet size (default 2500); "
        "rollout, fanout: cluster size (default 200); beat: schedules (default 500)",
    )
    parser.add_argument("--minutes", type=float, help="fleet: length of the long run (default 10)")
    parser.add_argument(
        "--concurrency", type=int, help="fleet: pool processes per control worker (default 2, as the Procfile)"
    )
    parser.add_argument(
        "--scale", type=float, help="rollout: install durations times this (default 1: 1-3 s); kept as 'rollout-xN'"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.minutes is not None and not args.minutes > 0:
        parser.error(f"--minutes must be a positive number, not {args.minutes}")
    if args.concurrency is not None and not args.concurrency > 0:
        parser.error(f"--concurrency must be a positive number, not {args.concurrency}")
    if args.scale is not None and not args.scale > 0:
        parser.error(f"--scale must be a positive number, not {args.scale}")
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    return args


def options(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("size", "runs", "nodes", "scale", "minutes", "concurrency")
    return {k: v for k in keys if (v := getattr(args, k)) is not None}


def run_child(name: str, module: str, opts: dict[str, Any], out: Path) -> None:
    """In the child process: run one benchmark, write its result as JSON."""
    started = time.monotonic()
    mod = importlib.import_module(module)
    result = mod.run(**{k: v for k, v in opts.items() if k in mod.OPTIONS})
    result["seconds"] = round(time.monotonic() - started, 1)
    out.write_text(json.dumps(result, indent=1, default=str))


def run_one(name: str, argv_opts: list[str]) -> dict[str, Any]:
    if BENCHMARKS[name] is None:
        print(NOT_YET[name], flush=True)
        return {"name": name, "implemented": False, "note": NOT_YET[name], "metrics": []}
    out = RESULTS.parent / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    print(f"== {name} ...", flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(out), *argv_opts]
    code = subprocess.call(cmd, cwd=ROOT)
    if code or not out.exists():
        return {"name": name, "implemented": True, "error": f"exited with {code}", "metrics": []}
    return {"name": name, "implemented": True, **json.loads(out.read_text())}


def fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def print_table(results: list[dict[str, Any]]) -> None:
    rows = [("benchmark", "figure", "value", "target", "result")]
    for res in results:
        if not res.get("implemented", True):
            rows.append((res["name"], "-", "not implemented yet", "", ""))
        elif "error" in res:
            rows.append((res["name"], "-", res["error"], "", "FAIL"))
        for m in res.get("metrics", []):
            verdict = {True: "pass", False: "FAIL", None: ""}[m["pass"]]
            rows.append((res["name"], m["figure"], f"{fmt(m['value'])} {m['unit']}", m["target"], verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def save(results: list[dict[str, Any]]) -> None:
    """Merge into results.json: running one benchmark keeps the others' latest figures."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged.setdefault("benchmarks", {})
    for res in results:
        merged["benchmarks"][res["name"]] = {**res, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    merged["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    RESULTS.write_text(json.dumps(merged, indent=1, default=str))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args.child, str(BENCHMARKS[args.child]), options(args), Path(args.out))
        return 0
    passthrough = [f"--{k}={v}" for k, v in options(args).items()]
    results = [run_one(name, passthrough) for name in (args.names or list(BENCHMARKS))]
    save(results)
    print()
    print_table(results)
    print(f"\nwritten: {RESULTS.relative_to(ROOT)}")
    failed = any("error" in r or any(m["pass"] is False for m in r.get("metrics", [])) for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
