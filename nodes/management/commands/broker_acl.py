"""manage.py broker_acl: the Redis users of tgpadmin (tgpadmin/broker_acl.py).

    manage.py broker_acl                      print the rules (never a password)
    manage.py broker_acl --out DIR            write DIR/<user>.url (0600) and DIR/users.acl
    manage.py broker_acl --apply              and make them the server's users

Nodes come from the database, plus --node NAME[:CLUSTER]. Passwords are kept in the
URL files (or TGP_BROKER_PASSWORD_<USER>) and survive a re-run unless --rotate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from tgpadmin import broker_acl as acl

OLD_REDIS_WARNING = (
    "WARNING: Redis {version} has no write-only key permissions (Redis 7's %W~): every node user "
    "can also READ and TAKE messages from the control queue (other nodes' reports, the chains' "
    "control steps). Only the message signatures keep a node from forging another node's reports "
    "or the control plane's commands (docs/security-broker.md). Use Redis 7 or later in production."
)


def _node_arg(value: str) -> tuple[str, str | None]:
    hostname, _, cluster = value.partition(":")
    try:
        acl.node_names([(hostname, cluster or None)])
    except acl.BrokerAclError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return hostname, cluster or None


class Command(BaseCommand):
    help = (
        "The Redis ACL users of tgpadmin: one per node (its own queue, write-only to the control "
        "queue), control, web, flower and admin; the default user off. Prints the rules, writes each "
        "user's broker URL to DIR/<user>.url (0600) with --out, applies them with --apply."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--apply", action="store_true", help="make these the users of the Redis at --redis-url")
        parser.add_argument(
            "--redis-url",
            help="an admin connection (default: DIR/admin.url if there is one, else REDIS_URL); "
            "with --apply the users are set there",
        )
        parser.add_argument(
            "--out", type=Path, help="where the URL files and users.acl go (default with --apply: TGP_BROKER_DIR)"
        )
        parser.add_argument(
            "--node",
            action="append",
            default=[],
            type=_node_arg,
            metavar="NAME[:CLUSTER]",
            help="a node that is not in the database (yet), repeatable",
        )
        parser.add_argument("--rotate", action="store_true", help="new passwords for every user")
        parser.add_argument(
            "--url-base",
            help="the broker URL the processes use, without user (default: --redis-url's), e.g. "
            "rediss://broker.example:6380/0",
        )
        parser.add_argument(
            "--redis-version",
            help="the Redis the rules are for, e.g. 7.0 or 6.2 (default: the server at --redis-url, "
            "else the embedded Redis's binary); not with --apply, which asks the server",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            self._handle(**options)
        except acl.BrokerAclError as exc:
            raise CommandError(str(exc)) from None

    def _handle(self, **options: Any) -> None:
        if options["apply"] and options["redis_version"]:
            raise CommandError("--redis-version is not for --apply: the rules are made for the server's version.")
        out: Path | None = options["out"] or (settings.TGP_BROKER_DIR if options["apply"] else None)
        admin_url = options["redis_url"] or self._kept_admin_url(out) or settings.REDIS_URL
        base = options["url_base"] or acl.base_url(admin_url)
        nodes = {**self._database_nodes(), **dict(options["node"])}
        users = acl.broker_users(nodes.items(), db=acl.url_db(base))
        if out is None:
            version = self._version(options, admin_url)
            self._warn_if_old(version)
            self._print_rules(users, version)
            return

        creds = acl.Credentials(out, base, rotate=options["rotate"])
        passwords = {u.name: creds.password(u.name) for u in users}
        for user in users:
            creds.write(user.name, passwords[user.name])
        if options["apply"]:
            # Through Sentinel: the primary and each replica (ACL is not replicated).
            versions = []
            for server in acl.servers(admin_url, settings.REDIS_SENTINEL):
                applied = acl.apply(server, users, passwords)
                versions.append(applied.redis_version)
                self._warn_if_old(applied.redis_version)
                deleted = ", ".join(applied.deleted) or "none"
                self.stdout.write(
                    f"applied to {acl.base_url(server)} (Redis {'.'.join(map(str, applied.redis_version))}): "
                    f"{len(users)} users, default user off; node users deleted: {deleted}"
                )
                if not applied.saved:
                    self.stderr.write(
                        f"{acl.base_url(server)} has no ACL file: these users live until it restarts. Start it with "
                        f"--aclfile {out / 'users.acl'} (or CONFIG REWRITE its config file), or run this again."
                    )
            version = min(versions)
        else:
            version = self._version(options, admin_url)
            self._warn_if_old(version)
        rules = {u.name: u.rules(version) for u in users}
        rules[acl.DEFAULT] = []
        acl.write_secret(out / "users.acl", acl.acl_file(rules, passwords))
        for stale in creds.stale(u.name for u in users):
            stale.unlink()
            self.stdout.write(f"removed {stale} (no such node any more)")
        for user in users:
            self.stdout.write(f"{user.name}: {creds.path(user.name)}")
        self.stdout.write(
            f"ACL file for Redis {'.'.join(map(str, version))} (password hashes only): {out / 'users.acl'}"
        )

    def _warn_if_old(self, version: tuple[int, ...]) -> None:
        if version < acl.MODERN:
            self.stderr.write(OLD_REDIS_WARNING.format(version=".".join(map(str, version))))

    def _kept_admin_url(self, out: Path | None) -> str | None:
        path = (out or settings.TGP_BROKER_DIR) / f"{acl.ADMIN}.url"
        return path.read_text().strip() if path.is_file() else None

    def _database_nodes(self) -> dict[str, str | None]:
        from django.db import DatabaseError

        from nodes.models import Node

        try:
            rows = list(Node.objects.values_list("hostname", "cluster__name"))
        except DatabaseError as exc:
            raise CommandError(
                f"cannot read the nodes from the database ({exc}); migrate, or name them with --node"
            ) from None
        return acl.node_names(rows)

    def _version(self, options: dict[str, Any], admin_url: str) -> tuple[int, ...]:
        if options["redis_version"]:
            return acl.redis_version_of(options["redis_version"])
        if options["redis_url"]:
            import redis

            from agent.shared.sentinel import SentinelConfigError, redis_client

            try:
                client = redis_client(admin_url, settings.REDIS_SENTINEL, socket_connect_timeout=5, socket_timeout=10)
                info = client.info("server")
            except SentinelConfigError as exc:
                raise CommandError(str(exc)) from None
            except redis.exceptions.NoPermissionError as exc:
                raise CommandError(f"the user of {acl.base_url(admin_url)} is not an admin ({exc})") from None
            except redis.exceptions.RedisError as exc:
                raise CommandError(f"cannot ask {acl.base_url(admin_url)} for its version: {exc}") from None
            return acl.redis_version_of(str(info["redis_version"]))
        from tgpadmin import embedded_redis

        found = embedded_redis.server_version(embedded_redis.redis_server_binary())
        return found[:2] or acl.MODERN

    def _print_rules(self, users: list[acl.BrokerUser], version: tuple[int, ...]) -> None:
        self.stdout.write(f"# Redis {'.'.join(map(str, version))}; passwords are never printed")
        for user in users:
            self.stdout.write(f"# {user.name}: " + "; ".join(g.why for g in user.grants))
            rules = " ".join(acl.printable(r) for r in user.rules(version))
            self.stdout.write(f"ACL SETUSER {user.name} reset on <password> {rules}")
        self.stdout.write(f"ACL SETUSER {acl.DEFAULT} reset")
        sys.stdout.flush()
