from __future__ import annotations

import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from agent.shared.sentinel import redis_client
from updates import heartbeats


class Command(BaseCommand):
    help = (
        "Take the nodes' heartbeats off the broker in batches and store them (a long-running process, "
        "one beside each control worker: the Procfile's `heartbeats`). Stops at SIGTERM or SIGINT."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--batch", type=int, default=heartbeats.BATCH, help=f"heartbeats taken at once (default {heartbeats.BATCH})"
        )
        parser.add_argument(
            "--linger",
            type=float,
            default=heartbeats.LINGER,
            help=f"seconds to let the list fill after a batch that was not full (default {heartbeats.LINGER})",
        )

    def handle(self, *args: Any, batch: int, linger: float, **options: Any) -> None:
        if not 1 <= batch <= 10_000:
            raise CommandError(f"--batch must be between 1 and 10000, not {batch}")
        if not 0 <= linger <= 5:  # also refuses nan
            raise CommandError(f"--linger must be between 0 and 5 seconds, not {linger}")
        stopping: list[int] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda number, _frame: stopping.append(number))
        client = redis_client(settings.REDIS_URL, settings.REDIS_SENTINEL)
        self.stdout.write(f"heartbeats: taking them off the broker, up to {batch} every {linger:g} s")
        self.stdout.flush()
        total = heartbeats.consume(client, stop=lambda: bool(stopping), batch=batch, linger=linger)
        self.stdout.write(f"heartbeats: stopped; {total.stored} stored, {total.refused} refused")
