"""Who is acting: the request's user and address (audit.middleware), or the OS user who
ran a management command (AuditedCommand). Rows written outside both (a Celery task,
the shell) have no actor."""

from __future__ import annotations

import getpass
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from django.core.management.base import BaseCommand


@dataclass(frozen=True)
class Acting:
    actor: Any = None  # a user, possibly lazy (request.user): read only when a row is written
    remote_addr: str | None = None
    via: str = ""  # "manage.py autoupdate"
    os_user: str = ""
    # One per request or command: ties together the rows of a bulk action.
    cid: str | None = field(default_factory=lambda: uuid.uuid4().hex)


NOBODY = Acting(cid=None)
# Reset when the request or command ends: a worker thread never keeps a past request's user.
_acting: ContextVar[Acting] = ContextVar("tgpadmin_audit_acting", default=NOBODY)


@contextmanager
def acting(**fields: Any) -> Iterator[Acting]:
    now = Acting(**fields)
    token = _acting.set(now)
    try:
        yield now
    finally:
        _acting.reset(token)


def current() -> Acting:
    return _acting.get()


def correlation_id() -> str | None:
    """AUDITLOG_CID_GETTER: our id, not a header the client chose."""
    return current().cid


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (a bare container)
        return f"uid {os.getuid()}"


class AuditedCommand(BaseCommand):
    """A command whose operator actions are recorded as made by the OS user who ran it,
    through this command. A command that names a tgpadmin user (--user) passes it to the
    service, which records it as the actor."""

    def execute(self, *args: Any, **options: Any) -> Any:
        name = type(self).__module__.rpartition(".")[2]
        with acting(via=f"manage.py {name}", os_user=os_user()):
            return super().execute(*args, **options)
