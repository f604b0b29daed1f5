from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from nodes.models import hostname_validator


class Command(BaseCommand):
    help = "Run the agent of one node: a Celery worker on that node's queue, no database needed."
    # The agent has no database credentials: skip checks that might want one.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("hostname", help="the node this agent serves, e.g. gw1")
        parser.add_argument("--driver", default=None, help="simulated, shell, or a dotted driver class path")
        parser.add_argument("--loglevel", default="INFO")

    def handle(self, *args: Any, hostname: str, driver: str | None, loglevel: str, **options: Any) -> None:
        try:
            hostname_validator(hostname)
        except ValidationError as exc:
            raise CommandError(f"{hostname!r}: {exc.messages[0]}") from None
        from nodes.agent import Agent

        Agent(hostname, driver=driver, loglevel=loglevel).run()
