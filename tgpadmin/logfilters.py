"""Logging filters (referenced from settings.LOGGING)."""

from __future__ import annotations

import logging

# Tasks that run all the time whether or not anything happens: every node's heartbeat
# (every TGP_HEARTBEAT_INTERVAL) and beat's housekeeping. What they change is logged
# by their own code; Celery's "received"/"succeeded" lines for them are noise.
ROUTINE_TASKS = frozenset(
    {"control.node_report", "control.reconcile", "control.reap_stale_runs", "control.rearm_schedules"}
)


class RoutineTasks(logging.Filter):
    """Drops Celery's INFO lines about routine tasks unless the log level is DEBUG.
    Their retries, warnings and failures are always logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not isinstance(record.args, dict):
            return True
        if record.args.get("name") not in ROUTINE_TASKS:
            return True
        return logging.getLogger().isEnabledFor(logging.DEBUG)
