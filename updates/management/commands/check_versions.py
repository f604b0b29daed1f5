"""The Nagios sensor: ``manage.py check_versions [NODE | --cluster NAME]``.

One status line on stdout, exit 0 OK / 1 WARNING / 2 CRITICAL / 3 UNKNOWN.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from django.core.management.base import BaseCommand, CommandParser

from nodes.models import Cluster, Node
from updates import nagios


class NagiosParser(CommandParser):
    """Usage errors are UNKNOWN (3) for Nagios; argparse would exit 2, which reads as CRITICAL."""

    def error(self, message: str) -> NoReturn:
        # The command's stdout is not set up while arguments are parsed.
        sys.stdout.write(nagios.unknown(f"bad arguments: {message}").line + "\n")
        sys.stdout.flush()
        raise SystemExit(int(nagios.Status.UNKNOWN))


class Command(BaseCommand):
    help = "Nagios check: are the nodes on the newest release, has a download failed?"
    # A sensor runs every few minutes and must print exactly one line: no system checks.
    requires_system_checks: list[str] = []

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # Django always builds a CommandParser; switch it to ours to change only error().
        parser.__class__ = NagiosParser
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        target = parser.add_mutually_exclusive_group()
        target.add_argument("node", nargs="?", help="host name of one node (default: all nodes)")
        target.add_argument("--cluster", help="check every node of this cluster")

    def handle(self, *args: Any, node: str | None, cluster: str | None, **options: Any) -> NoReturn:
        try:
            result = self.result(node, cluster)
        except Exception as exc:  # a database outage must read UNKNOWN, not a traceback and exit 1 (WARNING)
            result = nagios.unknown(f"check failed: {type(exc).__name__}: {exc}")
        self.stdout.write(result.line)
        self.stdout.flush()
        raise SystemExit(nagios.exit_code(result))

    def result(self, node: str | None, cluster: str | None) -> nagios.Result:
        if node is not None:
            found = Node.objects.filter(hostname=node).first()
            if found is None:
                return nagios.unknown(f"no node named {node!r}")
            return nagios.check_node(found)
        if cluster is not None:
            target = Cluster.objects.filter(name=cluster).first()
            if target is None:
                return nagios.unknown(f"no cluster named {cluster!r}")
            return nagios.check_nodes(Node.objects.filter(cluster=target), scope=f"cluster {target.name}")
        return nagios.check_nodes(Node.objects.all())
