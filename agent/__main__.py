"""``python -m agent NODE``: run the agent of one appliance.

    python -m agent gw1                      supervisor + worker on queue node.gw1
    python -m agent gw1 --driver shell       on a real host (TGP_SHELL_* commands)
    python -m agent enroll gw1               make the node's key pair, print its public key
    python -m agent simulate gw1 --version 2.1.0 --packages '{"tgpro-base": "2.1.0"}'
                                             create a simulated appliance (demo, tests)
    python -m agent simulate-logon gw1 carol  a user logs on to it (prints the session's inbox)

Configuration comes from the environment (agent/config.py; README, "Configuration").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from agent.shared.env import ConfigError
from agent.shared.protocol import HOSTNAME_RE, HOSTNAME_RULE, VERSION_RE, VERSION_RULE


def _hostname(value: str) -> str:
    if not HOSTNAME_RE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not {HOSTNAME_RULE}")
    return value


def _version(value: str) -> str:
    if not VERSION_RE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not {VERSION_RULE}")
    return value


def _packages(value: str) -> dict[str, str]:
    try:
        packages = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(packages, dict) or not all(isinstance(v, str) for v in packages.values()):
        raise argparse.ArgumentTypeError('expected an object of package versions, e.g. {"tgpro-base": "2.1.0"}')
    return packages


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agent",
        description="Run the agent of one appliance: a Celery worker on the node's own queue, "
        "with a supervisor that sends heartbeats and outlives reboots. Needs no database. "
        "'python -m agent enroll --help': the node's key; 'python -m agent simulate --help': a simulated appliance.",
    )
    parser.add_argument("hostname", type=_hostname, help="the node this agent serves, e.g. gw1")
    parser.add_argument("--driver", help="simulated, shell, or a dotted driver class path (default: TGP_NODE_DRIVER)")
    parser.add_argument("--loglevel", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def simulate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agent simulate",
        description="Create a simulated appliance in TGP_NODE_STATE_DIR/HOSTNAME if there is none, "
        "and print its state as the agent reports it (JSON).",
    )
    parser.add_argument("hostname", type=_hostname)
    parser.add_argument("--version", type=_version, required=True, help="the installed release")
    parser.add_argument("--packages", type=_packages, required=True, help="JSON object: package -> version")
    parser.add_argument("--users", default="", help="logged-in users, comma separated")
    parser.add_argument("--cluster", action="store_true", help="a cluster node (starts in the load balancer)")
    return parser


def simulate(argv: list[str]) -> int:
    args = simulate_parser().parse_args(argv)
    from agent.drivers.simulated import SimulatedDriver
    from agent.tasks import driver_for, snapshot_of

    driver = driver_for(args.hostname)
    if not isinstance(driver, SimulatedDriver):
        raise ConfigError("simulate needs TGP_NODE_DRIVER=simulated")
    users = [user for user in args.users.split(",") if user]
    driver.seed(version=args.version, packages=args.packages, users=users, cluster=args.cluster)
    print(json.dumps(snapshot_of(driver, instance="").to_wire()))
    return 0


def logon_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agent simulate-logon",
        description="A user logs on to a simulated appliance: a new session, which starts with the current "
        "maintenance notice while maintenance mode is on or a maintenance is announced. Prints the session's "
        "inbox (JSON); exit 1 while logon is off.",
    )
    parser.add_argument("hostname", type=_hostname)
    parser.add_argument("user")
    return parser


def simulate_logon(argv: list[str]) -> int:
    args = logon_parser().parse_args(argv)
    from agent.drivers.simulated import LogonRefused, SimulatedDriver
    from agent.tasks import driver_for

    driver = driver_for(args.hostname)
    if not isinstance(driver, SimulatedDriver) or not driver.exists():
        raise ConfigError(f"simulate-logon needs TGP_NODE_DRIVER=simulated and a simulated {args.hostname}")
    try:
        inbox = driver.log_on(args.user)
    except LogonRefused as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(inbox))
    return 0


def enroll_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agent enroll",
        description="Make the node's key pair if it has none (the private key never leaves the node) and print "
        "its public key and fingerprint. An operator in group 'update' accepts it on the node's admin page, "
        "after comparing the fingerprint; until then the control plane trusts nothing the node says.",
    )
    parser.add_argument("hostname", type=_hostname)
    parser.add_argument(
        "--repo-root",
        type=Path,
        help="pin this TUF root of the update repository (TGP_REPO_ROOT_FILE) unless one is pinned; "
        "compare the sha256 printed with the one `manage.py repo_keys show` prints",
    )
    parser.add_argument(
        "--json", action="store_true", help="print {hostname, public_key, fingerprint, repository_root} as JSON"
    )
    return parser


def pin_root(source: Path | None) -> dict[str, Any] | None:
    """The pinned repository root (pinned from `source` first if none is): version and sha256.
    A different root already pinned is never replaced here: the root chain rotates keys."""
    from agent.config import config
    from agent.shared.files import atomic_write
    from agent.shared.repository import RepositoryError, root_summary

    pinned = config().repo_root_file
    if source is not None:
        try:
            offered = source.read_bytes()
        except OSError as exc:
            raise ConfigError(f"--repo-root {source}: {exc.strerror}") from None
        try:
            root_summary(offered)
        except RepositoryError as exc:
            raise ConfigError(f"--repo-root {source}: {exc}") from None
        if not pinned.exists():
            atomic_write(pinned, offered)
        elif pinned.read_bytes() != offered:
            raise ConfigError(
                f"a different repository root is pinned already ({pinned}); keys rotate through the root chain, "
                "so it stays: remove it by hand only to move the node to another repository"
            )
    if not pinned.exists():
        return None
    try:
        return root_summary(pinned.read_bytes()) | {"file": str(pinned)}
    except RepositoryError as exc:
        raise ConfigError(f"TGP_REPO_ROOT_FILE {pinned}: {exc}") from None


def enroll(argv: list[str]) -> int:
    args = enroll_parser().parse_args(argv)
    from agent import identity
    from agent.shared.signing import fingerprint

    root = pin_root(args.repo_root)
    public, made = identity.enroll(args.hostname)
    found = {"hostname": args.hostname, "public_key": public, "fingerprint": fingerprint(public)}
    found["repository_root"] = root
    if args.json:
        print(json.dumps(found))
        return 0
    print(f"{'new key' if made else 'key'} of {args.hostname} ({identity.key_path(args.hostname)})")
    print(f"  public key:  {public}")
    print(f"  fingerprint: {found['fingerprint']}")
    print("Accept it on the node's admin page (group 'update') after comparing the fingerprint.")
    if root is None:
        print("No repository root is pinned: the node refuses every download until one is (--repo-root FILE).")
    else:
        print(f"Repository root pinned: version {root['version']}, sha256 {root['sha256']} ({root['file']})")
    return 0


def run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    if args.driver:
        os.environ["TGP_NODE_DRIVER"] = args.driver  # the worker reads it too
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from agent.supervisor import Supervisor

    return Supervisor(args.hostname, loglevel=args.loglevel).run()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["simulate"]:
            return simulate(argv[1:])
        if argv[:1] == ["simulate-logon"]:
            return simulate_logon(argv[1:])
        if argv[:1] == ["enroll"]:
            return enroll(argv[1:])
        return run(argv)
    except ConfigError as exc:
        print(f"agent: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
