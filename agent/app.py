"""The agent's own Celery app: the node tasks only, configured from the agent's
environment, no Django.

``fixups=[]``: Celery would otherwise load its Django fix-up (and Django) whenever
DJANGO_SETTINGS_MODULE happens to be set in the environment.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from agent.config import config
from agent.shared.protocol import CONTROL_QUEUE, PUBLISH_RETRY_POLICY

# The control side's processes run in TGP_TIME_ZONE (Django sets TZ from TIME_ZONE).
# Celery adjusts event times by each sender's local UTC offset, so an agent in another
# zone would show to Flower and the control worker as an hour or more adrift.
os.environ["TZ"] = config().time_zone
time.tzset()

# Not the process's current app: a test process (or a benchmark) loads both apps.
app = Celery("agent", fixups=[], set_as_current=False)
app.conf.update(
    broker_url=config().redis_url,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # A node's outcome travels in its step reports and the chain, never in a result backend.
    task_ignore_result=True,
    task_default_queue=CONTROL_QUEUE,
    task_publish_retry=True,
    task_publish_retry_policy=PUBLISH_RETRY_POLICY,
    # An agent publishes only reports and the next step of its own chain: no "task-sent"
    # event for each (a second publish); Flower sees those tasks from the receiving worker.
    task_send_sent_event=False,
    worker_send_task_events=True,
    worker_prefetch_multiplier=1,
    include=["agent.tasks"],
)
