"""The agent's own Celery app: the node tasks only, configured from the agent's
environment, no Django.

``fixups=[]``: Celery would otherwise load its Django fix-up (and Django) whenever
DJANGO_SETTINGS_MODULE happens to be set in the environment.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from kombu import Queue

from agent.config import config
from agent.shared.protocol import CONTROL_QUEUE, PUBLISH_RETRY_POLICY, node_queue
from agent.shared.sentinel import is_sentinel_url
from agent.shared.transport import transport_for

# The control side's processes run in TGP_TIME_ZONE (Django sets TZ from TIME_ZONE).
# Celery adjusts event times by each sender's local UTC offset, so an agent in another
# zone would show to Flower and the control worker as an hour or more adrift.
os.environ["TZ"] = config().time_zone
time.tzset()

_sentinel = config().redis_sentinel
_sentinel_options = _sentinel.transport_options() if _sentinel and is_sentinel_url(config().redis_url) else {}

# Not the process's current app: a test process (or a benchmark) loads both apps.
app = Celery("agent", fixups=[], set_as_current=False)
app.conf.update(
    broker_url=config().redis_url,
    # kombu's Redis transport, with one client per channel for publishing (agent/shared/transport.py).
    broker_transport=transport_for(config().redis_url),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # A node's outcome travels in its step reports and the chain, never in a result backend.
    task_ignore_result=True,
    task_default_queue=CONTROL_QUEUE,
    # Declared by nobody here: on Redis a declaration reads the queue's length and adds to
    # its binding table, which the node's broker user need not do (docs/security-broker.md).
    # Publishing to a direct queue goes straight to its list; consuming is a BRPOP.
    task_queues=[Queue(name, no_declare=True) for name in (CONTROL_QUEUE, *map(node_queue, config().served))],
    task_publish_retry=True,
    task_publish_retry_policy=PUBLISH_RETRY_POLICY,
    # An agent publishes only reports and the next step of its own chain: no "task-sent"
    # event for each (a second publish); Flower sees those tasks from the receiving worker.
    task_send_sent_event=False,
    worker_send_task_events=True,
    worker_prefetch_multiplier=1,
    # No remote control: nothing can shut the agent down, or make it consume another
    # node's queue, over the broker, and the node's broker user needs no pidbox access.
    worker_enable_remote_control=False,
    # Node steps are acknowledged on receipt (agent/tasks.py): no ack emulation, so the
    # agent keeps what it has taken in memory and touches none of the transport's
    # shared "unacked" keys, which hold the in-flight messages of every queue.
    # Through Sentinel (a sentinel:// URL), kombu also needs the name the Sentinels monitor
    # the primary under and their own credentials; it asks them again after a failover.
    broker_transport_options={"ack_emulation": False, **_sentinel_options},
    include=["agent.tasks"],
)
