"""The audit trail: every operator action leaves exactly one row per node or object it
concerns, with who, from which address, what and where; a refused action leaves none;
the admin's list is read-only for everybody, searchable by node, cluster and user, and
costs the same queries for thirty rows as for three. Nothing here runs a worker or an
agent: what a start or a notice queues at commit is dropped with the test's transaction."""

from __future__ import annotations

import getpass
import json
import uuid
from datetime import timedelta
from io import StringIO

import pytest
from auditlog.models import LogEntry
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.contrib.auth.models import Group
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from agent.shared import signing
from audit.records import Operation
from hotfixes.models import Contact, Delivery, HotfixNotice
from nodes import keys
from nodes.models import Cluster, Node, NodeKey
from updates.models import MaintenanceNotice, Release, UpdateLock, UpdateRun, UpdateSchedule
from updates.runs import locks
from updates.runs.cluster_cap import cluster_slots

pytestmark = pytest.mark.django_db
ADDR = "198.51.100.7"  # the operator's, as the web process sees the connection
FMT = "%Y-%m-%d %H:%M:%S"


# --- helpers -----------------------------------------------------------------------------


def rows(operation: Operation, **where: str) -> list[LogEntry]:
    found = LogEntry.objects.filter(additional_data__operation=operation.value).order_by("pk")
    for key, value in where.items():
        found = found.filter(**{f"additional_data__{key}": value})
    return list(found)


def only(operation: Operation, **where: str) -> LogEntry:
    found = rows(operation, **where)
    assert len(found) == 1, f"{len(found)} rows of {operation.value}: {[r.additional_data for r in found]}"
    return found[0]


def assert_by(row: LogEntry, user, *, node: str | None = None, cluster: str | None = None, addr: str = ADDR):
    assert row.actor == user
    assert row.remote_addr == addr
    if node is not None:
        assert row.additional_data["node"] == node
    if cluster is not None:
        assert row.additional_data["cluster"] == cluster


def operator_rows() -> int:
    """Rows of anything but the fixtures' own enrollment (make_node offers and accepts a key)."""
    fixtures = [Operation.KEY_OFFERED.value, Operation.KEY_ACCEPTED.value]
    return LogEntry.objects.exclude(additional_data__operation__in=fixtures).count()


class Client:
    """The test client, each request from ADDR."""

    def __init__(self, client) -> None:
        self.client = client

    def get(self, url: str, data=None, **extra):
        return self.client.get(url, data, REMOTE_ADDR=ADDR, **extra)

    def post(self, url: str, data=None, **extra):
        return self.client.post(url, data or {}, REMOTE_ADDR=ADDR, **extra)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def op(staff):
    return staff("op", "update")


@pytest.fixture
def as_op(client, op) -> Client:
    client.force_login(op)
    return Client(client)


@pytest.fixture
def cluster(db) -> Cluster:
    return Cluster.objects.create(name=unique("c"), max_parallel_updates=2)


def updatable(make_node, **kw) -> Node:
    node = make_node("gw", **kw)
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0", logged_in_users=["alice"])
    return Node.objects.select_related("cluster").get(pk=node.pk)


@pytest.fixture
def gw(make_node, releases) -> Node:
    return updatable(make_node)


def cli(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def action(name: str, *objects) -> dict:
    return {"action": name, "_selected_action": [obj.pk for obj in objects]}


# --- starts ----------------------------------------------------------------------------------


def test_autoupdate_of_a_cluster_from_the_admin_is_a_row_per_node_tied_by_one_id(
    as_op, op, make_node, cluster, releases
):
    nodes = [updatable(make_node, cluster=cluster) for _ in range(3)]
    response = as_op.post(reverse("admin:nodes_node_autoupdate"), {"ids": ",".join(str(n.pk) for n in nodes),
                                                                   "confirm": "yes"})  # fmt: skip
    assert response.status_code == 302
    found = rows(Operation.START_UPDATE)
    assert [row.additional_data["node"] for row in found] == [n.hostname for n in nodes], "one row per node"
    for row, node in zip(found, nodes, strict=True):
        assert_by(row, op, node=node.hostname, cluster=cluster.name)
        run = UpdateRun.objects.get(node=node)
        assert (row.content_type.model, row.object_id) == ("updaterun", run.pk)
        assert row.additional_data["release"] == "2.2.0"
    assert len({row.cid for row in found}) == 1 and found[0].cid, "the rows of one action share its id"


def test_autoupdate_from_the_command_line_names_the_os_user_and_the_command(gw):
    cli("autoupdate", gw.hostname, "--yes")
    row = only(Operation.START_UPDATE, node=gw.hostname)
    assert row.actor is None and row.remote_addr is None
    assert row.additional_data["via"] == "manage.py autoupdate"
    assert row.additional_data["os_user"] == getpass.getuser()


def test_a_refused_autoupdate_leaves_no_row(as_op, gw):
    locks.set_lock(gw, "failed")
    as_op.post(reverse("admin:nodes_node_autoupdate"), {"ids": gw.pk, "confirm": "yes"})
    with pytest.raises(CommandError, match="update lock"):
        cli("autoupdate", gw.hostname, "--yes")
    assert not UpdateRun.objects.exists() and rows(Operation.START_UPDATE) == []


def test_catchup_from_the_admin_and_from_the_command_line(as_op, op, gw, make_node, releases):
    url = reverse("admin:nodes_node_catchup", args=[gw.pk])
    assert as_op.post(url, {"mode": "partial"}).status_code == 200, "no packages: the form says so"
    assert rows(Operation.CATCHUP) == []
    assert as_op.post(url, {"mode": "partial", "packages": ["tgpro-vnc"]}).status_code == 302
    row = only(Operation.CATCHUP)
    assert_by(row, op, node=gw.hostname)
    assert row.additional_data["packages"] == ["tgpro-vnc"] and row.additional_data["release"] == "2.0.0"
    other = updatable(make_node)
    cli("catchup", other.hostname, "--full", "--yes")
    assert only(Operation.CATCHUP, node=other.hostname).additional_data["via"] == "manage.py catchup"


# --- announcements ---------------------------------------------------------------------------


def test_an_announced_update_from_the_admin_and_from_the_command_line(as_op, op, gw, make_node):
    update_at = (timezone.localtime() + timedelta(hours=2)).strftime(FMT)
    data = {"ids": gw.pk, "confirm": "yes", "when": "at", "update_at": update_at, "message": ""}
    assert as_op.post(reverse("admin:nodes_node_autoupdate"), data).status_code == 302
    row = only(Operation.ANNOUNCE_UPDATE)
    assert_by(row, op, node=gw.hostname)
    assert row.object_id == MaintenanceNotice.objects.get(node=gw).pk and row.additional_data["release"] == "2.2.0"
    other = updatable(make_node)
    cli("autoupdate", other.hostname, "--yes", "--in", "2h")
    assert only(Operation.ANNOUNCE_UPDATE, node=other.hostname).additional_data["via"] == "manage.py autoupdate"
    assert rows(Operation.START_UPDATE) == [], "announced, not started"


def test_a_maintenance_notice_is_a_row_per_node_and_a_bad_time_none(as_op, op, gw, make_node):
    other = updatable(make_node)
    ids = f"{gw.pk},{other.pk}"
    past = (timezone.localtime() - timedelta(hours=1)).strftime(FMT)
    as_op.post(reverse("admin:nodes_node_announce"), {"ids": ids, "message": "Tonight", "starts_at": past})
    assert rows(Operation.ANNOUNCE_MAINTENANCE) == []
    starts = (timezone.localtime() + timedelta(hours=2)).strftime(FMT)
    as_op.post(reverse("admin:nodes_node_announce"), {"ids": ids, "message": "Tonight", "starts_at": starts})
    assert_by(only(Operation.ANNOUNCE_MAINTENANCE, node=gw.hostname), op)
    assert_by(only(Operation.ANNOUNCE_MAINTENANCE, node=other.hostname), op)


def test_cancelling_an_announcement_is_one_row_and_cancelling_it_again_none(as_op, op, gw):
    notice = MaintenanceNotice.objects.create(
        node=gw, message="m", starts_at=timezone.now() + timedelta(hours=2), state=MaintenanceNotice.State.PENDING,
        release=Release.objects.get(version="2.2.0"),
    )  # fmt: skip
    url = reverse("admin:updates_maintenancenotice_changelist")
    as_op.post(url, action("cancel", notice))
    as_op.post(url, action("cancel", notice))
    row = only(Operation.CANCEL_ANNOUNCEMENT)
    assert_by(row, op, node=gw.hostname)
    assert row.object_id == notice.pk


# --- locks, maintenance mode, slots ----------------------------------------------------------


def test_removing_a_lock_from_each_place_is_one_row_each(as_op, op, staff, gw, make_node):
    locks.set_lock(gw, "download failed")
    as_op.post(reverse("admin:nodes_node_remove_lock", args=[gw.pk]))
    as_op.post(reverse("admin:nodes_node_remove_lock", args=[gw.pk]))  # no lock left: nothing happens
    row = only(Operation.REMOVE_LOCK)
    assert_by(row, op, node=gw.hostname)
    assert row.object_id == UpdateLock.objects.get(node=gw).pk

    second, third, fourth = (updatable(make_node) for _ in range(3))
    for node in (second, third, fourth):
        locks.set_lock(node, "failed")
    nodes_url = reverse("admin:nodes_node_changelist")
    as_op.post(nodes_url, action("remove_update_lock", second))
    locks_url = reverse("admin:updates_updatelock_changelist")
    as_op.post(locks_url, action("remove", UpdateLock.objects.active().get(node=third)))
    assert_by(only(Operation.REMOVE_LOCK, node=second.hostname), op)
    assert_by(only(Operation.REMOVE_LOCK, node=third.hostname), op)

    cli("remove_update_lock", fourth.hostname, "--user", op.username)
    row = only(Operation.REMOVE_LOCK, node=fourth.hostname)
    assert row.actor == op and row.additional_data["via"] == "manage.py remove_update_lock"


def test_ending_maintenance_mode_is_one_row_and_refused_while_updating_none(client, staff, gw, releases):
    maintainer = staff("maintainer", "maint")
    client.force_login(maintainer)
    Node.objects.filter(pk=gw.pk).update(maintenance_mode=True)
    run = UpdateRun.objects.create(node=gw, release=releases["2.2.0"])
    Client(client).post(reverse("admin:nodes_node_end_maintenance", args=[gw.pk]))
    assert rows(Operation.END_MAINTENANCE) == [], "refused while the node updates"
    UpdateRun.objects.filter(pk=run.pk).update(state=UpdateRun.State.FAILED)
    Client(client).post(reverse("admin:nodes_node_end_maintenance", args=[gw.pk]))
    assert_by(only(Operation.END_MAINTENANCE), maintainer, node=gw.hostname)


def test_releasing_a_gone_holders_slot_is_one_row_and_a_node_holding_none_leaves_none(as_op, op, cluster):
    cluster_slots().acquire(cluster.name, "ghost", 2)
    url = reverse("admin:nodes_cluster_release_slot", args=[cluster.pk])
    as_op.post(url, {"node": "nobody"})
    as_op.post(url, {"node": ""})
    assert rows(Operation.RELEASE_SLOT) == []
    as_op.post(url, {"node": "ghost"})
    row = only(Operation.RELEASE_SLOT)
    assert_by(row, op, node="ghost", cluster=cluster.name)
    assert (row.content_type.model, row.object_id) == ("cluster", cluster.pk)


# --- schedules and plans ---------------------------------------------------------------------


def schedule_form(**fields) -> dict:
    return {
        "name": "weekly", "node": "", "cluster": "", "cron": "0 3 * * 0", "run_at_0": "", "run_at_1": "",
        "timezone": "Europe/Berlin", "download_lead": "01:00:00", "download_cron": "", "time_control": "on",
        **fields,
    }  # fmt: skip


def test_adding_changing_and_deleting_a_schedule_is_a_row_each(as_op, op, cluster):
    add = as_op.post(reverse("admin:updates_updateschedule_add"), schedule_form(cluster=cluster.pk, cron="bad"))
    assert add.status_code == 200 and rows(Operation.SCHEDULE_ADD) == [], "refused: no row"
    as_op.post(reverse("admin:updates_updateschedule_add"), schedule_form(cluster=cluster.pk))
    schedule = UpdateSchedule.objects.get(cluster=cluster)
    row = only(Operation.SCHEDULE_ADD)
    assert_by(row, op, cluster=cluster.name)
    assert row.changes["cron"] == ["", "0 3 * * 0"] and row.action == LogEntry.Action.CREATE

    change = reverse("admin:updates_updateschedule_change", args=[schedule.pk])
    as_op.post(change, schedule_form(cluster=cluster.pk, cron="0 4 * * 0"))
    as_op.post(change, schedule_form(cluster=cluster.pk, cron="0 4 * * 0"))  # saved unchanged: nothing happened
    row = only(Operation.SCHEDULE_CHANGE)
    assert_by(row, op, cluster=cluster.name)
    assert row.changes == {"cron": ["0 3 * * 0", "0 4 * * 0"]}

    as_op.post(reverse("admin:updates_updateschedule_delete", args=[schedule.pk]), {"post": "yes"})
    assert not UpdateSchedule.objects.exists()
    row = only(Operation.SCHEDULE_DELETE)
    assert_by(row, op, cluster=cluster.name)
    assert row.object_repr == "weekly" and row.action == LogEntry.Action.DELETE


def test_switching_time_control_is_a_row_per_schedule(as_op, op, make_node):
    schedules = [UpdateSchedule.objects.create(name=f"s{i}", node=make_node("gw"), cron="0 3 * * 0") for i in range(2)]
    url = reverse("admin:updates_updateschedule_changelist")
    as_op.post(url, action("switch_off", *schedules))
    as_op.post(url, action("switch_on", schedules[0]))
    off = rows(Operation.TIME_CONTROL_OFF)
    assert sorted(row.object_id for row in off) == sorted(s.pk for s in schedules)
    for row, schedule in zip(off, sorted(schedules, key=lambda s: s.pk), strict=True):
        assert_by(row, op, node=schedule.node.hostname)
    assert only(Operation.TIME_CONTROL_ON).object_id == schedules[0].pk


@pytest.fixture
def planned(cluster, make_node, releases):
    """A cluster schedule two days ahead, with three nodes."""
    nodes = sorted((make_node("gw", cluster=cluster) for _ in range(3)), key=lambda n: n.hostname)
    at = (timezone.localtime() + timedelta(days=2)).replace(hour=3, minute=0, second=0, microsecond=0)
    schedule = UpdateSchedule.objects.create(name="nightly", cluster=cluster, run_at=at)
    return schedule, at, nodes


def plan_url(schedule, name):
    return reverse(f"admin:updates_updateschedule_plan_{name}", args=[schedule.pk])


def test_moving_a_node_in_a_plan_is_one_row_and_a_refused_move_none(as_op, op, planned):
    schedule, at, nodes = planned
    data = {"occurrence": at.isoformat(), "node": nodes[0].pk}
    as_op.post(plan_url(schedule, "move"), {**data, "planned_at": (at - timedelta(days=3)).strftime("%Y-%m-%dT%H:%M")})
    assert rows(Operation.PLAN_MOVE) == []
    later = at + timedelta(hours=2)
    as_op.post(plan_url(schedule, "move"), {**data, "planned_at": later.strftime("%Y-%m-%dT%H:%M:%S")})
    row = only(Operation.PLAN_MOVE)
    assert_by(row, op, node=nodes[0].hostname, cluster=schedule.cluster.name)
    assert (row.content_type.model, row.object_id) == ("updateschedule", schedule.pk)
    assert row.changes["planned_at"][1] == later.isoformat()


def test_leaving_a_node_out_calls_its_run_off_in_one_row_and_putting_it_back_is_another(as_op, op, planned, releases):
    schedule, at, nodes = planned
    UpdateRun.objects.create(node=nodes[0], release=releases["2.2.0"], trigger="scheduled", schedule=schedule,
                             scheduled_for=at).steps.create(name="leave", position=0)  # fmt: skip
    Node.objects.filter(pk=nodes[0].pk).update(maintenance_mode=True)
    data = {"occurrence": at.isoformat(), "node": nodes[0].pk}
    as_op.post(plan_url(schedule, "exclude"), {**data, "excluded": "1"})
    assert UpdateRun.objects.get(node=nodes[0]).state == UpdateRun.State.CANCELLED
    assert_by(only(Operation.PLAN_LEAVE_OUT), op, node=nodes[0].hostname, cluster=schedule.cluster.name)
    assert rows(Operation.END_MAINTENANCE) == [], "the call-off's maintenance end is part of the same action"
    as_op.post(plan_url(schedule, "exclude"), {**data, "excluded": "0"})
    assert_by(only(Operation.PLAN_PUT_BACK), op, node=nodes[0].hostname)


def test_putting_a_node_back_into_its_schedule_is_one_row_and_refused_with_a_lock_none(as_op, op, planned):
    from updates.models import LeftSchedule

    schedule, _, nodes = planned
    LeftSchedule.objects.create(schedule=schedule, node=nodes[1], reason="download failed twice")
    locks.set_lock(nodes[1], "download failed twice")
    as_op.post(plan_url(schedule, "put-back"), {"node": nodes[1].pk})
    assert rows(Operation.SCHEDULE_REJOIN) == []
    locks.remove_lock(nodes[1], None)
    as_op.post(plan_url(schedule, "put-back"), {"node": nodes[1].pk})
    assert_by(only(Operation.SCHEDULE_REJOIN), op, node=nodes[1].hostname, cluster=schedule.cluster.name)


# --- clusters and contacts ---------------------------------------------------------------------


def cluster_form(name: str, **fields) -> dict:
    return {"name": name, "max_parallel_updates": 1, "lb_lead_time": "01:00:00", "max_out_of_lb": "",
            "expected_update": "00:30:00", **fields}  # fmt: skip


def test_adding_changing_the_cap_of_and_deleting_a_cluster_is_a_row_each(admin_client, admin_user):
    admin = Client(admin_client)
    name = unique("c")
    admin.post(reverse("admin:nodes_cluster_add"), cluster_form(name, max_parallel_updates=0))
    assert rows(Operation.CLUSTER_ADD) == [], "a cap of 0 is refused"
    admin.post(reverse("admin:nodes_cluster_add"), cluster_form(name))
    cluster = Cluster.objects.get(name=name)
    row = only(Operation.CLUSTER_ADD)
    assert_by(row, admin_user, cluster=name)
    assert row.changes["name"] == ["", name]

    change = reverse("admin:nodes_cluster_change", args=[cluster.pk])
    admin.post(change, cluster_form(name, max_parallel_updates=3))
    row = only(Operation.CLUSTER_CHANGE)
    assert_by(row, admin_user, cluster=name)
    assert row.changes == {"max_parallel_updates": ["1", "3"]}

    admin.post(reverse("admin:nodes_cluster_delete", args=[cluster.pk]), {"post": "yes"})
    assert not Cluster.objects.filter(name=name).exists()
    assert_by(only(Operation.CLUSTER_DELETE), admin_user, cluster=name)


def contact_form(name: str, nodes=(), clusters=(), **fields) -> dict:
    return {"name": name, "email": "ops@customer.test", "phone": "", "nodes": [n.pk for n in nodes],
            "clusters": [c.pk for c in clusters], "active": "on", **fields}  # fmt: skip


def test_a_contact_change_is_one_row_with_its_fields_and_its_nodes(admin_client, gw, make_node, cluster):
    admin = Client(admin_client)
    admin.post(reverse("admin:hotfixes_contact_add"), contact_form("Ops", email="", phone=""))
    assert rows(Operation.CONTACT_ADD) == [], "neither e-mail nor phone: refused"
    admin.post(reverse("admin:hotfixes_contact_add"), contact_form("Ops", nodes=[gw]))
    contact = Contact.objects.get(name="Ops")
    added = only(Operation.CONTACT_ADD)
    assert added.changes["nodes"] == ["", gw.hostname] and added.remote_addr == ADDR

    other = make_node("gw")
    change = reverse("admin:hotfixes_contact_change", args=[contact.pk])
    admin.post(change, contact_form("Ops Team", nodes=[other], clusters=[cluster]))
    row = only(Operation.CONTACT_CHANGE)
    assert row.changes == {
        "name": ["Ops", "Ops Team"], "nodes": [gw.hostname, other.hostname], "clusters": ["", cluster.name],
    }, "one row for the fields and both relations"  # fmt: skip

    admin.post(reverse("admin:hotfixes_contact_delete", args=[contact.pk]), {"post": "yes"})
    assert only(Operation.CONTACT_DELETE).object_repr == "Ops Team"
    more = [Contact.objects.create(name=name, email="x@customer.test") for name in ("A", "B")]
    url = reverse("admin:hotfixes_contact_changelist")
    admin.post(url, {**action("delete_selected", *more), "post": "yes"})
    assert not Contact.objects.exists()
    assert sorted(row.object_repr for row in rows(Operation.CONTACT_DELETE)) == ["A", "B", "Ops Team"]


# --- node keys -------------------------------------------------------------------------------


def new_key() -> str:
    return signing.public_b64(Ed25519PrivateKey.generate())


def test_enrollment_offer_accept_rekey_and_revoke_are_a_row_each_with_fingerprints_only(as_op, op, db):
    node = Node.objects.create(hostname=unique("enroll"))
    first, second = new_key(), new_key()
    offered = keys.offer(node, first)
    row = only(Operation.KEY_OFFERED, node=node.hostname)
    assert row.actor is None and row.additional_data["fingerprint"] == offered.fingerprint

    as_op.post(reverse("admin:nodes_node_accept_key", args=[node.pk]), {"key": offered.pk})
    assert_by(only(Operation.KEY_ACCEPTED, node=node.hostname), op)

    replacing = keys.offer(node, second)
    as_op.post(reverse("admin:nodes_node_accept_key", args=[node.pk]), {"key": offered.pk})  # no longer waiting
    as_op.post(reverse("admin:nodes_node_accept_key", args=[node.pk]), {"key": replacing.pk})
    row = only(Operation.KEY_REPLACED, node=node.hostname)
    assert_by(row, op)
    assert row.additional_data["replaced"] == offered.fingerprint
    assert row.additional_data["fingerprint"] == replacing.fingerprint

    as_op.post(reverse("admin:nodes_node_revoke_key", args=[node.pk]), {"note": "node stolen"})
    as_op.post(reverse("admin:nodes_node_revoke_key", args=[node.pk]))  # nothing accepted any more
    row = only(Operation.KEY_REVOKED, node=node.hostname)
    assert_by(row, op)
    assert row.additional_data["note"] == "node stolen"
    assert NodeKey.objects.get(pk=replacing.pk).state == NodeKey.State.REVOKED

    everything = json.dumps(list(LogEntry.objects.values("object_repr", "additional_data", "changes")))
    assert first not in everything and second not in everything, "fingerprints, never the keys themselves"


def test_a_newer_offer_rejects_the_waiting_key_in_the_offers_row(db):
    node = Node.objects.create(hostname=unique("enroll"))
    waiting = keys.offer(node, new_key())
    keys.offer(node, new_key())
    assert rows(Operation.KEY_OFFERED, node=node.hostname)[1].additional_data["rejected"] == [waiting.fingerprint]


# --- hotfix notices -------------------------------------------------------------------------


def test_sending_a_hotfix_notice_and_resending_failed_deliveries_is_a_row_each(as_op, op, gw):
    release = Release.objects.create(version="2.2.1", channel="stable", hotfix=True)
    notice = HotfixNotice.objects.create(release=release, title="Fix", text="Apply it.")
    notice.nodes.set([gw])
    Contact.objects.create(name="Ops", email="ops@customer.test").nodes.set([gw])
    url = reverse("admin:hotfixes_hotfixnotice_changelist")
    as_op.post(url, action("send_notification", notice))
    Delivery.objects.update(state=Delivery.State.SENT)  # as the delivery task does
    as_op.post(url, action("send_notification", notice))  # nothing new to send: nothing happened
    row = only(Operation.HOTFIX_SEND)
    assert_by(row, op)
    assert row.object_id == notice.pk and row.additional_data["queued"] == 1
    as_op.post(url, action("resend_failed", notice))
    assert rows(Operation.HOTFIX_RESEND) == [], "nothing failed"
    Delivery.objects.update(state=Delivery.State.FAILED)
    as_op.post(url, action("resend_failed", notice))
    assert_by(only(Operation.HOTFIX_RESEND), op)


# --- refusals --------------------------------------------------------------------------------


def test_a_request_refused_for_a_missing_role_leaves_no_row(client, staff, gw, cluster, releases):
    viewer = Client(client)
    client.force_login(staff("viewer"))
    locks.set_lock(gw, "failed")
    Node.objects.filter(pk=gw.pk).update(maintenance_mode=True)
    cluster_slots().acquire(cluster.name, "ghost", 2)
    pending = keys.offer(gw, new_key())
    before = operator_rows()
    posts = [
        (reverse("admin:nodes_node_autoupdate"), {"ids": gw.pk, "confirm": "yes"}),
        (reverse("admin:nodes_node_catchup", args=[gw.pk]), {"mode": "full"}),
        (reverse("admin:nodes_node_remove_lock", args=[gw.pk]), {}),
        (reverse("admin:nodes_node_end_maintenance", args=[gw.pk]), {}),
        (reverse("admin:nodes_node_accept_key", args=[gw.pk]), {"key": pending.pk}),
        (reverse("admin:nodes_node_revoke_key", args=[gw.pk]), {}),
        (reverse("admin:nodes_cluster_release_slot", args=[cluster.pk]), {"node": "ghost"}),
        (reverse("admin:nodes_cluster_change", args=[cluster.pk]), cluster_form(cluster.name, max_parallel_updates=5)),
        (reverse("admin:updates_updateschedule_add"), schedule_form(cluster=cluster.pk)),
        (reverse("admin:hotfixes_contact_add"), contact_form("Ops")),
    ]
    for url, data in posts:
        assert viewer.post(url, data).status_code == 403, url
    changelists = {"nodes_node": "remove_update_lock", "updates_updatelock": "remove",
                   "updates_maintenancenotice": "cancel", "hotfixes_hotfixnotice": "send_notification"}  # fmt: skip
    for name, chosen in changelists.items():
        response = viewer.post(reverse(f"admin:{name}_changelist"), {"action": chosen, "_selected_action": [1]})
        assert response.status_code == 403, name
    assert operator_rows() == before == 0


# --- the admin: who sees it, read-only, search, queries -------------------------------------------


LIST = "admin:auditlog_logentry_changelist"


def test_both_groups_see_the_trail_and_other_staff_without_the_permission_do_not(client, staff, db):
    for group in ("update", "maint"):
        assert Group.objects.get(name=group).permissions.filter(codename="view_logentry").exists(), group
    client.force_login(staff("maintainer", "maint"))
    assert client.get(reverse(LIST)).status_code == 200
    nobody = staff("nobody")
    nobody.user_permissions.clear()
    client.force_login(nobody)
    assert client.get(reverse(LIST)).status_code == 403


def test_the_trail_is_read_only_for_everybody_superusers_included(admin_client, gw):
    locks.set_lock(gw, "failed")
    locks.remove_lock(gw, None)
    row = only(Operation.REMOVE_LOCK)
    assert admin_client.get(reverse("admin:auditlog_logentry_add")).status_code == 403
    change = reverse("admin:auditlog_logentry_change", args=[row.pk])
    page = admin_client.get(change)
    assert page.status_code == 200 and "Save" not in page.text and gw.hostname in page.text
    assert admin_client.post(change, {"object_repr": "forged", "action": 0}).status_code == 403
    delete = reverse("admin:auditlog_logentry_delete", args=[row.pk])
    assert admin_client.get(delete).status_code == 403
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    admin_client.post(reverse(LIST), {"action": "delete_selected", "_selected_action": [row.pk], "post": "yes"})
    assert LogEntry.objects.get(pk=row.pk).object_repr == row.object_repr, "neither changed nor deleted"


def listed(client, **params) -> set[str]:
    page = client.get(reverse(LIST), params)
    assert page.status_code == 200
    return {entry.additional_data.get("node", "") for entry in page.context["cl"].result_list}


def test_the_list_is_searched_by_node_cluster_and_user_and_filtered_by_action_and_date(
    client, staff, make_node, cluster, releases
):
    alice, bob = staff("alice", "update"), staff("bob", "update")
    lone, member = make_node("lone"), make_node("member", cluster=cluster)
    locks.set_lock(lone, "failed")
    locks.set_lock(member, "failed")
    locks.remove_lock(lone, alice)
    locks.remove_lock(member, bob)
    client.force_login(alice)
    assert listed(client, q=lone.hostname) >= {lone.hostname} and member.hostname not in listed(client, q=lone.hostname)
    assert listed(client, q=cluster.name) == {member.hostname}
    assert listed(client, q="bob") == {member.hostname}
    assert listed(client, operation=Operation.REMOVE_LOCK.value) == {lone.hostname, member.hostname}
    assert listed(client, operation=Operation.START_UPDATE.value) == set()
    today = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)  # the date filter's "Today"
    tomorrow = today + timedelta(days=1)
    assert listed(client, timestamp__gte=today.isoformat(), timestamp__lt=tomorrow.isoformat()) >= {
        lone.hostname, member.hostname,
    }  # fmt: skip
    assert listed(client, timestamp__gte=tomorrow.isoformat()) == set()
    assert listed(client, node=member.hostname) == {member.hostname}, "the node page's link"
    assert listed(client, cluster=cluster.name) == {member.hostname}, "the cluster page's link"


def test_the_node_page_links_to_its_rows(client, staff, gw):
    client.force_login(staff("op", "update"))
    page = client.get(reverse("admin:nodes_node_change", args=[gw.pk]))
    assert f'{reverse(LIST)}?node={gw.hostname}">Audit trail</a>' in page.text


def test_the_list_costs_the_same_queries_for_thirty_rows_as_for_three(admin_client, staff, make_node):
    users = [staff(f"op{i}", "update") for i in range(3)]

    def grow(count: int) -> None:
        for i in range(count):
            node = make_node("q")
            locks.set_lock(node, "failed")
            locks.remove_lock(node, users[i % 3])

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            page = admin_client.get(reverse(LIST), {"operation": Operation.REMOVE_LOCK.value})
        assert page.status_code == 200
        return len(captured)

    grow(3)
    few = queries()
    grow(27)
    assert queries() == few
    assert LogEntry.objects.filter(additional_data__operation=Operation.REMOVE_LOCK.value).count() == 30


# --- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("proxies", "forwarded", "recorded"),
    [
        (0, "203.0.113.9", ADDR),  # no proxy: the header is the client's own invention
        (1, "203.0.113.9", "203.0.113.9"),  # what our proxy saw
        (1, "6.6.6.6, 203.0.113.9", "203.0.113.9"),  # left of it: the client's invention again
        (2, "6.6.6.6, 203.0.113.9, 10.0.0.2", "203.0.113.9"),
        (1, "not-an-address", None),
    ],
)
def test_the_address_is_the_connections_or_what_our_proxies_saw(as_op, op, gw, settings, proxies, forwarded, recorded):
    settings.TGP_PROXY_COUNT = proxies
    locks.set_lock(gw, "failed")
    as_op.post(reverse("admin:nodes_node_remove_lock", args=[gw.pk]), HTTP_X_FORWARDED_FOR=forwarded)
    assert only(Operation.REMOVE_LOCK).remote_addr == recorded


# --- rollouts ------------------------------------------------------------------------------


def test_pausing_resuming_and_cancelling_a_rollout_and_its_threshold_each_leave_one_row(
    as_op, op, make_node, releases, cluster
):
    from nodes import services
    from updates.models import Rollout

    nodes = [updatable(make_node, cluster=cluster) for _ in range(3)]
    runs, refused = services.start_planned(services.plan_updates(nodes), op)
    assert not refused
    rollout = Rollout.objects.get(pk=runs[0].rollout_id)

    def act(name: str) -> None:
        assert as_op.post(reverse(f"admin:updates_rollout_{name}", args=[rollout.pk])).status_code == 302

    act("pause")
    act("pause")  # refused: paused already, no second row
    assert_by(only(Operation.ROLLOUT_PAUSE), op, cluster=cluster.name)
    act("resume")
    assert_by(only(Operation.ROLLOUT_RESUME), op, cluster=cluster.name)

    page = reverse("admin:updates_rollout_change", args=[rollout.pk])
    assert as_op.post(page, {"failure_threshold": "2", "failure_threshold_unit": "count"}).status_code == 302
    changed = only(Operation.ROLLOUT_CHANGE)
    assert_by(changed, op, cluster=cluster.name)
    assert changed.changes["failure_threshold"] == ["1", "2"]

    act("cancel")
    cancelled = only(Operation.ROLLOUT_CANCEL)
    assert_by(cancelled, op, cluster=cluster.name)
    assert cancelled.additional_data["cancelled_runs"] == 3
    assert cancelled.object_pk == str(rollout.pk)
