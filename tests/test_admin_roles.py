"""Every page needs a login; update and maintenance actions are for their groups
only, and anybody else gets 403, whichever way the request comes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from nodes.models import Node
from updates.models import MaintenanceNotice, UpdateLock, UpdateRun
from updates.runs import locks
from updates.runs.chains import QueueChain, QueueStarted

pytestmark = pytest.mark.django_db


@pytest.fixture
def gw(make_node, releases):
    node = make_node("gw", users=("alice", "bob"))
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0", logged_in_users=["alice", "bob"])
    return Node.objects.get(pk=node.pk)


def signed_command(envelope: dict) -> dict:
    """The command in a message for a node, which must carry the control plane's signature."""
    from agent.shared import signing
    from tests.conftest import CONTROL_KEY

    return signing.verify(envelope, signing.load_public(CONTROL_KEY.public))["command"]


def login(client, user):
    client.force_login(user)
    return client


@pytest.mark.parametrize("url", ["/", "/admin/", "/admin/nodes/node/", "/admin/updates/updaterun/"])
def test_every_page_needs_a_login(client, url):
    response = client.get(url)
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_staff_without_group_gets_403_for_every_role_action(client, staff, gw):
    login(client, staff("viewer"))
    assert client.get(reverse("admin:nodes_node_autoupdate") + f"?ids={gw.pk}").status_code == 403
    assert client.post(reverse("admin:nodes_node_autoupdate"), {"ids": gw.pk, "confirm": "yes"}).status_code == 403
    assert client.post(reverse("admin:nodes_node_remove_lock", args=[gw.pk])).status_code == 403
    assert client.post(reverse("admin:nodes_node_end_maintenance", args=[gw.pk])).status_code == 403
    assert client.get(reverse("admin:nodes_node_announce") + f"?ids={gw.pk}").status_code == 403
    for action in ["autoupdate", "remove_update_lock", "end_maintenance", "announce_maintenance"]:
        response = client.post(reverse("admin:nodes_node_changelist"), {"action": action, "_selected_action": [gw.pk]})
        assert response.status_code == 403, action
    assert not UpdateRun.objects.exists()


def test_viewer_sees_the_fleet_but_no_role_actions(client, staff, gw):
    login(client, staff("viewer"))
    response = client.get(reverse("admin:nodes_node_changelist"))
    assert response.status_code == 200
    assert gw.hostname in response.text
    assert "Auto-Update" not in response.text and "End maintenance mode" not in response.text


def test_confirmation_page_lists_the_users_who_will_be_logged_off(client, staff, gw):
    login(client, staff("op", "update"))
    action = {"action": "autoupdate", "_selected_action": [gw.pk]}
    page = client.post(reverse("admin:nodes_node_changelist"), action)
    assert page.status_code == 200
    assert "alice, bob" in page.text and "2.2.0" in page.text
    assert not UpdateRun.objects.exists(), "nothing starts before the confirmation"


def test_update_group_starts_autoupdate_after_confirmation(client, staff, gw, django_capture_on_commit_callbacks):
    operator = staff("op", "update")
    login(client, operator)
    with django_capture_on_commit_callbacks(execute=False) as queued:
        response = client.post(reverse("admin:nodes_node_autoupdate"), {"ids": gw.pk, "confirm": "yes"})
    run = UpdateRun.objects.get(node=gw)
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:updates_updaterun_change", args=[run.pk])
    assert run.started_by == operator and run.release.version == "2.2.0"
    assert queued == [QueueStarted((QueueChain(run.pk, "notify"),))], "the chain is queued once the transaction commits"
    gw.refresh_from_db()
    assert gw.maintenance_mode


def test_update_group_announces_maintenance_to_the_selected_nodes(
    client, staff, gw, make_node, django_capture_on_commit_callbacks
):
    other = make_node("gw")
    login(client, staff("op", "update"))
    page = client.post(
        reverse("admin:nodes_node_changelist"),
        {"action": "announce_maintenance", "_selected_action": [gw.pk, other.pk]},
    )
    assert page.status_code == 200 and gw.hostname in page.text and other.hostname in page.text
    starts = (timezone.localtime() + timedelta(hours=2)).strftime("%Y-%m-%d %H:%M:%S")
    with django_capture_on_commit_callbacks(execute=False) as queued:
        response = client.post(
            reverse("admin:nodes_node_announce"),
            {"ids": page.context["ids"], "message": "Update tonight", "starts_at": starts},
        )
    assert response.status_code == 302
    assert set(MaintenanceNotice.objects.values_list("node", flat=True)) == {gw.pk, other.pk}
    notices = MaintenanceNotice.objects.order_by("pk")
    sent = [(cb.__self__.task, signed_command(cb.__self__.args[0])) for cb in queued]
    assert [(task, command["node"], command["notice_id"]) for task, command in sent] == [
        ("node.announce", n.node.hostname, f"notice-{n.pk}") for n in notices
    ], "one notice per node, queued once the transaction commits"
    assert all("Update tonight" in command["message"] for _, command in sent)


def test_update_group_removes_a_lock_and_the_history_keeps_who(client, staff, gw):
    operator = staff("op", "update")
    locks.set_lock(gw, "download failed")
    login(client, operator)
    response = client.post(reverse("admin:nodes_node_remove_lock", args=[gw.pk]))
    assert response.status_code == 302
    lock = UpdateLock.objects.get(node=gw)
    assert lock.removed_by == operator and lock.removed_at is not None
    page = client.get(reverse("admin:nodes_node_change", args=[gw.pk]))
    assert "download failed" in page.text and "removed" in page.text and "op" in page.text


def test_maint_group_cannot_remove_locks_and_update_group_cannot_end_maintenance(client, staff, gw):
    locks.set_lock(gw, "failed")
    Node.objects.filter(pk=gw.pk).update(maintenance_mode=True)
    login(client, staff("maintainer", "maint"))
    assert client.post(reverse("admin:nodes_node_remove_lock", args=[gw.pk])).status_code == 403
    lock = UpdateLock.objects.get(node=gw)
    action = {"action": "remove", "_selected_action": [lock.pk]}
    response = client.post(reverse("admin:updates_updatelock_changelist"), action)
    assert response.status_code == 403
    client.logout()
    login(client, staff("op", "update"))
    assert client.post(reverse("admin:nodes_node_end_maintenance", args=[gw.pk])).status_code == 403
    assert UpdateLock.objects.get(node=gw).removed_at is None
    assert Node.objects.get(pk=gw.pk).maintenance_mode


def test_maint_group_ends_maintenance_mode(client, staff, gw, django_capture_on_commit_callbacks):
    Node.objects.filter(pk=gw.pk).update(maintenance_mode=True, maintenance_reason="failed run")
    login(client, staff("maintainer", "maint"))
    with django_capture_on_commit_callbacks(execute=False) as queued:
        response = client.post(reverse("admin:nodes_node_end_maintenance", args=[gw.pk]))
    assert response.status_code == 302
    assert not Node.objects.get(pk=gw.pk).maintenance_mode
    sent = [(cb.__self__.task, signed_command(cb.__self__.args[0])["node"]) for cb in queued]
    assert sent == [("node.end_maintenance", gw.hostname)], "the agent is told to release logon"
