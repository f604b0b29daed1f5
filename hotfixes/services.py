"""Hotfix notifications as plain functions: tasks, admin actions and tests call these.

The Delivery rows are the truth. A delivery is sent only by whoever moves it from
``pending`` to ``sending`` with a conditional UPDATE, so duplicate task messages,
a second "Send notification" or a concurrent "Resend failed" never notify anybody twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from functools import partial
from typing import Any

from celery import signature
from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from agent.shared.protocol import CONTROL_QUEUE
from audit.records import Operation, record
from hotfixes import mail, phone
from hotfixes.errors import PermanentDeliveryError, TemporaryDeliveryError, scrub
from hotfixes.models import Contact, Delivery, HotfixNotice
from nodes.models import Cluster, Node

log = logging.getLogger(__name__)

DELIVER_TASK = "hotfix.deliver"
MAX_ERROR_CHARS = 2000


# --- who is affected ----------------------------------------------------------------


def affected_nodes(notice: HotfixNotice) -> QuerySet[Node]:
    """The notice's nodes plus every node of its clusters."""
    return Node.objects.filter(Q(hotfix_notices=notice) | Q(cluster__hotfix_notices=notice)).distinct()


def affected_clusters(notice: HotfixNotice) -> QuerySet[Cluster]:
    """The notice's clusters plus the cluster of each of its nodes."""
    return Cluster.objects.filter(Q(hotfix_notices=notice) | Q(nodes__hotfix_notices=notice)).distinct()


def affected_contacts(notice: HotfixNotice) -> QuerySet[Contact]:
    nodes = affected_nodes(notice).values("pk")
    clusters = affected_clusters(notice).values("pk")
    return Contact.objects.filter(active=True).filter(Q(nodes__in=nodes) | Q(clusters__in=clusters)).distinct()


def channels_for(notice: HotfixNotice, contact: Contact) -> list[str]:
    channels = [Delivery.Channel.EMAIL.value] if contact.email else []
    if notice.is_urgent and contact.phone:
        channels.append(Delivery.Channel.SMS.value)
        if contact.wants_calls:
            channels.append(Delivery.Channel.CALL.value)
    return channels


def nodes_running_hotfix(notice: HotfixNotice) -> list[Node]:
    """Affected nodes that already run the hotfix: its version, or all of its packages."""
    release = notice.release
    wanted = dict(release.packages.values_list("name", "version"))
    nodes = affected_nodes(notice).only("hostname", "installed_version", "installed_packages").order_by("hostname")

    def runs_it(node: Node) -> bool:
        if node.installed_version == release.version:
            return True
        # JSON containment lookups are not available on SQLite, hence the comparison here.
        installed = node.installed_packages or {}
        return bool(wanted) and all(installed.get(name) == version for name, version in wanted.items())

    return [node for node in nodes if runs_it(node)]


# --- planning and queueing --------------------------------------------------------


def plan_deliveries(notice: HotfixNotice) -> int:
    """Create the missing Delivery rows; returns how many are new."""
    created = 0
    for contact in affected_contacts(notice):
        for channel in channels_for(notice, contact):
            _, new = Delivery.objects.get_or_create(notice=notice, contact=contact, channel=channel)
            created += new
    return created


def send_notification(notice: HotfixNotice) -> int:
    """Plan, then queue every pending delivery. Returns how many were queued."""
    with transaction.atomic():
        plan_deliveries(notice)
        ids = list(notice.deliveries.filter(state=Delivery.State.PENDING).values_list("pk", flat=True))
        first = HotfixNotice.objects.filter(pk=notice.pk, sent_at__isnull=True).update(sent_at=timezone.now())
        _queue_on_commit(ids)
        if ids or first:  # sent again with nothing new to send: nothing happened
            record(Operation.HOTFIX_SEND, notice, release=notice.release.version, queued=len(ids))
    log.info("hotfix notice %s: queued %d deliveries", notice.pk, len(ids))
    return len(ids)


def resend_failed(notice: HotfixNotice) -> int:
    """Put failed deliveries back to pending and queue them. Returns how many."""
    with transaction.atomic():
        failed = notice.deliveries.filter(state=Delivery.State.FAILED)
        ids = list(failed.values_list("pk", flat=True))
        Delivery.objects.filter(pk__in=ids, state=Delivery.State.FAILED).update(
            state=Delivery.State.PENDING, updated_at=timezone.now()
        )
        _queue_on_commit(ids)
        if ids:
            record(Operation.HOTFIX_RESEND, notice, release=notice.release.version, queued=len(ids))
    log.info("hotfix notice %s: queued %d failed deliveries again", notice.pk, len(ids))
    return len(ids)


def _queue_on_commit(ids: list[int]) -> None:
    # Queued after commit: a worker must find the rows the message names.
    if ids:
        transaction.on_commit(partial(queue_deliveries, ids))


def queue_deliveries(ids: Iterable[int]) -> None:
    for pk in ids:
        signature(DELIVER_TASK, args=(pk,)).set(queue=CONTROL_QUEUE).apply_async()


# --- one delivery -------------------------------------------------------------------


def deliver(delivery_id: int, *, final: bool = False) -> str:
    """Send one delivery if it is still pending; returns its state afterwards.

    Temporary errors put it back to pending and raise TemporaryDeliveryError, unless
    ``final`` (the last retry): then it ends failed, and the error is still raised.
    """
    claimed = Delivery.objects.filter(pk=delivery_id, state=Delivery.State.PENDING).update(
        state=Delivery.State.SENDING, attempts=F("attempts") + 1, updated_at=timezone.now()
    )
    if not claimed:
        log.info("delivery %s: not pending (taken by another task, or done)", delivery_id)
        return "skipped"
    delivery = Delivery.objects.select_related("contact", "notice__release").get(pk=delivery_id)
    try:
        ref = _send(delivery)
    except PermanentDeliveryError as exc:
        return _finish(delivery, Delivery.State.FAILED, error=str(exc))
    except TemporaryDeliveryError as exc:
        _finish(delivery, Delivery.State.FAILED if final else Delivery.State.PENDING, error=str(exc))
        raise
    except Exception as exc:
        # A bug, not the provider: record it rather than leave the row "sending" for ever.
        _finish(delivery, Delivery.State.FAILED, error=f"Unexpected error: {type(exc).__name__}: {exc}")
        raise
    return _finish(delivery, Delivery.State.SENT, ref=ref)


def fail_if_stuck(delivery_id: int, error: str) -> None:
    """After a task died with the row still claimed: mark it failed so that it can be resent."""
    Delivery.objects.filter(pk=delivery_id, state=Delivery.State.SENDING).update(
        state=Delivery.State.FAILED, last_error=scrub(error)[:MAX_ERROR_CHARS], updated_at=timezone.now()
    )


def _finish(delivery: Delivery, state: str, *, ref: str = "", error: str = "") -> str:
    fields: dict[str, Any] = {"state": state, "address": delivery.address, "updated_at": timezone.now()}
    if state == Delivery.State.SENT:
        fields.update(provider_ref=ref[:200], last_error="")
    else:
        fields["last_error"] = scrub(error)[:MAX_ERROR_CHARS]
    # Conditional: only the claimant finishes, and only once.
    Delivery.objects.filter(pk=delivery.pk, state=Delivery.State.SENDING).update(**fields)
    level = logging.INFO if state == Delivery.State.SENT else logging.WARNING
    log.log(level, "delivery %s (%s, attempt %s): %s", delivery.pk, delivery.channel, delivery.attempts, state)
    return state


def _send(delivery: Delivery) -> str:
    contact, notice = delivery.contact, delivery.notice
    if not contact.active:
        raise PermanentDeliveryError("The contact has been deactivated.")
    if delivery.channel == Delivery.Channel.EMAIL:
        if not contact.email:
            raise PermanentDeliveryError("The contact has no e-mail address.")
        delivery.address = contact.email
        return mail.send(mail.build_message(notice, contact, email_context(notice, contact)))
    if not contact.phone:
        raise PermanentDeliveryError("The contact has no phone number.")
    delivery.address = contact.phone
    gateway = phone.gateway()
    if delivery.channel == Delivery.Channel.SMS:
        return gateway.send_sms(contact.phone, sms_text(notice))
    return gateway.call(contact.phone, call_text(notice))


# --- texts --------------------------------------------------------------------------


def email_context(notice: HotfixNotice, contact: Contact) -> dict[str, Any]:
    """Only the contact's own affected systems: other customers' hosts are none of their business."""
    own = Q(hotfix_contacts=contact) | Q(cluster__hotfix_contacts=contact)
    nodes = affected_nodes(notice).filter(own).values_list("hostname", flat=True).distinct()
    clusters = affected_clusters(notice).filter(hotfix_contacts=contact).values_list("name", flat=True).distinct()
    return {"hostnames": sorted(set(nodes)), "cluster_names": sorted(set(clusters))}


def sms_text(notice: HotfixNotice) -> str:
    return f"URGENT hotfix {notice.release.version}: {notice.title}. {notice.text} Details by e-mail."


def call_text(notice: HotfixNotice) -> str:
    return (
        f"This is an urgent hotfix notice for version {notice.release.version}. {notice.title}. {notice.text} "
        "Details have been sent by e-mail."
    )
