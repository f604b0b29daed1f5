"""Celery application: configured from Django settings (CELERY_* names)."""

import os
import time
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tgpadmin.settings")

app = Celery("tgpadmin")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# How often a control process looks after its database connections between tasks.
CONNECTION_CHECK_INTERVAL = 1.0
_next_check = 0.0  # monotonic time of the next look


@task_prerun.connect
@task_postrun.connect
def _close_old_connections(sender: Any = None, **_: Any) -> None:
    """Between tasks what Django does between requests: drop a database connection that
    is broken or older than CONN_MAX_AGE, keep the others.

    Celery's own Django fix-up closes every connection around every task (celery#9824)
    unless CELERY_DB_REUSE_MAX is set, which the settings do: a new PostgreSQL connection
    per heartbeat was most of a heartbeat's cost (bench/fleet.py). And Django's way,
    with CONN_HEALTH_CHECKS, costs a "SELECT 1" before each task's first query, as much
    as a heartbeat's own query: so at most once a second, and at once after a task that
    hit a database error (a connection that broke is dropped before the next task)."""
    global _next_check
    from django.db import close_old_connections, connections

    if getattr(getattr(sender, "request", None), "is_eager", False):  # a test's transaction is not ours to end
        return
    now = time.monotonic()
    if now >= _next_check or any(conn.errors_occurred for conn in connections.all(initialized_only=True)):
        close_old_connections()
        _next_check = now + CONNECTION_CHECK_INTERVAL
