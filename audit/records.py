"""Writing the audit trail: one row per operator action and per node or object it
concerns (a bulk Auto-Update of thirty nodes: thirty rows, tied by one correlation id).

The services both the admin and the management commands call record here, in the
transaction of the action itself: a refused or failed action leaves no row, and an
action that finds nothing to do (no lock to remove) leaves none either. The actor is
the user the service was given, else whoever is acting (audit.context); the address
is the request's. Rows carry names, not only ids: the node's host name and its
cluster's name (what the admin searches), and a fingerprint, never key material,
passwords or tokens."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from auditlog.models import LogEntry
from django.contrib.contenttypes.models import ContentType
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models

from audit.context import Acting, current
from nodes.models import Cluster, Node


class Operation(models.TextChoices):
    START_UPDATE = "start_update", "Auto-Update started"
    CATCHUP = "catchup", "Catch-up from Oldstable started"
    ANNOUNCE_UPDATE = "announce_update", "Update announced"
    ANNOUNCE_MAINTENANCE = "announce_maintenance", "Maintenance announced"
    CANCEL_ANNOUNCEMENT = "cancel_announcement", "Announcement cancelled"
    REMOVE_LOCK = "remove_lock", "Update lock removed"
    END_MAINTENANCE = "end_maintenance", "Maintenance mode ended"
    RELEASE_SLOT = "release_slot", "Update slot released"
    SCHEDULE_ADD = "schedule_add", "Schedule added"
    SCHEDULE_CHANGE = "schedule_change", "Schedule changed"
    SCHEDULE_DELETE = "schedule_delete", "Schedule deleted"
    TIME_CONTROL_ON = "time_control_on", "Time control switched on"
    TIME_CONTROL_OFF = "time_control_off", "Time control switched off"
    PLAN_MOVE = "plan_move", "Plan: node moved"
    PLAN_LEAVE_OUT = "plan_leave_out", "Plan: node left out"
    PLAN_PUT_BACK = "plan_put_back", "Plan: node put back"
    SCHEDULE_REJOIN = "schedule_rejoin", "Node put back into its schedule"
    CLUSTER_ADD = "cluster_add", "Cluster added"
    CLUSTER_CHANGE = "cluster_change", "Cluster changed"
    CLUSTER_DELETE = "cluster_delete", "Cluster deleted"
    CONTACT_ADD = "contact_add", "Contact added"
    CONTACT_CHANGE = "contact_change", "Contact changed"
    CONTACT_DELETE = "contact_delete", "Contact deleted"
    KEY_OFFERED = "key_offered", "Node key offered (by the node)"
    KEY_ACCEPTED = "key_accepted", "Node key accepted"
    KEY_REPLACED = "key_replaced", "Node re-keyed"
    KEY_REVOKED = "key_revoked", "Node key revoked"
    HOTFIX_SEND = "hotfix_send", "Hotfix notice sent"
    HOTFIX_RESEND = "hotfix_resend", "Hotfix deliveries resent"
    ROLLOUT_PAUSE = "rollout_pause", "Rollout paused"
    ROLLOUT_RESUME = "rollout_resume", "Rollout resumed"
    ROLLOUT_CANCEL = "rollout_cancel", "Rollout cancelled"
    ROLLOUT_CHANGE = "rollout_change", "Rollout's failure threshold changed"


# auditlog's own action, for its rendering: what the operation did to the row's object.
_CREATES = {
    Operation.START_UPDATE, Operation.CATCHUP, Operation.ANNOUNCE_UPDATE, Operation.ANNOUNCE_MAINTENANCE,
    Operation.SCHEDULE_ADD, Operation.CLUSTER_ADD, Operation.CONTACT_ADD, Operation.KEY_OFFERED,
}  # fmt: skip
_DELETES = {Operation.SCHEDULE_DELETE, Operation.CLUSTER_DELETE, Operation.CONTACT_DELETE}


def record(
    operation: Operation, obj: models.Model, *, user: Any = None, changes: Mapping[str, Any] | None = None,
    **details: Any,
) -> None:  # fmt: skip
    """One row: `operation` on `obj` (a run, a notice, a node, a cluster...), with details
    (those that are None or empty are left out)."""
    record_each(operation, [(obj, details)], user=user, changes=changes)


def record_each(
    operation: Operation,
    items: Iterable[tuple[models.Model, Mapping[str, Any]]],
    *,
    user: Any = None,
    changes: Mapping[str, Any] | None = None,
) -> None:
    """A row per (object, details): two queries however many rows."""
    items = list(items)
    if not items:
        return
    who = current()
    actor = _user(user) or _user(who.actor)
    clusters = _cluster_names(obj for obj, _ in items)
    LogEntry.objects.bulk_create(
        LogEntry(
            content_type=ContentType.objects.get_for_model(obj),  # cached by Django after the first
            object_pk=str(obj.pk),
            object_id=obj.pk if isinstance(obj.pk, int) else None,
            object_repr=str(obj),
            action=_action(operation),
            changes=_json(changes) if changes else None,
            actor=actor,
            remote_addr=who.remote_addr,
            cid=who.cid,
            additional_data=_data(operation, obj, details, who, clusters),
        )
        for obj, details in items
    )


def _user(user: Any) -> Any:
    """A saved user (request.user may be anonymous or lazy), else None."""
    return user if getattr(user, "pk", None) else None


def _action(operation: Operation) -> int:
    if operation in _CREATES:
        return LogEntry.Action.CREATE
    return LogEntry.Action.DELETE if operation in _DELETES else LogEntry.Action.UPDATE


def _node(obj: models.Model) -> Node | None:
    """The node a row is about: the object itself, or its node (a run, notice, lock, key, schedule)."""
    if isinstance(obj, Node):
        return obj
    node = getattr(obj, "node", None)
    return node if isinstance(node, Node) else None


def _cluster_id(obj: models.Model) -> int | None:
    """The cluster of a row about something else than the cluster itself."""
    node = _node(obj)
    return node.cluster_id if node is not None else getattr(obj, "cluster_id", None)


def _cluster_names(objs: Iterable[models.Model]) -> dict[int, str]:
    ids = {cluster_id for obj in objs if (cluster_id := _cluster_id(obj)) is not None}
    return dict(Cluster.objects.filter(pk__in=ids).values_list("pk", "name")) if ids else {}


def _data(
    operation: Operation, obj: models.Model, details: Mapping[str, Any], who: Acting, clusters: dict[int, str]
) -> dict[str, Any]:
    """additional_data: what the admin searches and filters by (operation, node, cluster),
    the action's details, and how a command line actor was known."""
    data: dict[str, Any] = {"operation": operation.value}
    node, cluster_id = _node(obj), _cluster_id(obj)
    if node is not None:
        data["node"] = node.hostname
    if isinstance(obj, Cluster):
        data["cluster"] = obj.name
    elif cluster_id is not None:
        data["cluster"] = clusters.get(cluster_id, "")
    data.update((key, value) for key, value in details.items() if value not in (None, "", []))  # what says something
    if who.via:
        data.update(via=who.via, os_user=who.os_user)
    return _json(data)


def _json(value: Mapping[str, Any]) -> Any:
    """Times, durations and the like as JSON keeps them (ISO 8601 text)."""
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder))
