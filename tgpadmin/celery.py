"""Celery application: configured from Django settings (CELERY_* names)."""

import os
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tgpadmin.settings")

app = Celery("tgpadmin")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
@task_postrun.connect
def _close_old_connections(sender: Any = None, **_: Any) -> None:
    """Around each task what Django does around each request: drop a database connection
    that is broken or older than CONN_MAX_AGE, keep the others. Celery's own Django
    fix-up closes every connection around every task (celery#9824) unless
    CELERY_DB_REUSE_MAX is set, which the settings do: a new PostgreSQL connection per
    heartbeat was most of a heartbeat's cost (bench/fleet.py)."""
    from django.db import close_old_connections

    if not getattr(getattr(sender, "request", None), "is_eager", False):  # a test's transaction is not ours to end
        close_old_connections()
