"""Sending a notice to a node's users: one signed `node.announce`, queued when the
transaction commits. Used by announcements, their withdrawal and a plan's delays."""

from __future__ import annotations

from datetime import datetime

from celery import signature
from django.db import transaction

from agent.shared.protocol import ANNOUNCE, NoticeCommand
from nodes.models import Node
from updates import trust


def send_notice(node: Node, notice_id: str, message: str, at: datetime, withdraws: str = "") -> None:
    """Queue a signed notice to the node's agent once the transaction commits (the agent
    writes `at` in the appliance's zone)."""
    notice = NoticeCommand(
        node=node.hostname, notice_id=notice_id, message=message, at=at.timestamp(), withdraws=withdraws
    )
    command = trust.command("notice", notice.to_wire())
    transaction.on_commit(signature(ANNOUNCE, args=(command,)).set(queue=node.queue).apply_async)
