"""Every list page of our admin costs the same queries for 30 rows as for 3: the
admin's rule that no query count grows with the rows shown, for every model an
operator lists, not only the node and run lists that the benchmark times."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from hotfixes.models import Contact, Delivery, HotfixNotice
from nodes.models import Cluster, Node
from updates.models import MaintenanceNotice, Release, UpdateLock, UpdateRun, UpdateSchedule

pytestmark = pytest.mark.django_db
_serial = itertools.count(1)


def user() -> User:
    return User.objects.create_user(f"u{next(_serial)}")


def cluster() -> Cluster:
    made = Cluster.objects.create(name=f"c{next(_serial)}")
    Node.objects.create(hostname=f"{made.name}-n1", cluster=made)
    return made


def node() -> Node:
    return Node.objects.create(hostname=f"n{next(_serial)}", cluster=cluster())


def release() -> Release:
    return Release.objects.create(version=f"3.{next(_serial)}.0", channel=Release.Channel.STABLE)


def run() -> UpdateRun:
    return UpdateRun.objects.create(node=node(), release=release(), started_by=user(), state=UpdateRun.State.FAILED)


def lock() -> UpdateLock:
    failed = run()
    return UpdateLock.objects.create(node=failed.node, run=failed, reason="failed", removed_by=user())


def notice() -> MaintenanceNotice:
    return MaintenanceNotice.objects.create(node=node(), message="m", starts_at=timezone.now(), created_by=user())


def schedule() -> UpdateSchedule:
    return UpdateSchedule.objects.create(name=f"s{next(_serial)}", cluster=cluster(), cron="0 3 * * *")


def contact() -> Contact:
    n = next(_serial)
    return Contact.objects.create(name=f"contact {n}", email=f"c{n}@example.org", phone="+49301234567")


def hotfix() -> HotfixNotice:
    return HotfixNotice.objects.create(release=release(), title="t", text="x", created_by=user())


def delivery() -> Delivery:
    return Delivery.objects.create(notice=hotfix(), contact=contact(), channel=Delivery.Channel.EMAIL)


LISTS: dict[str, Callable[[], Any]] = {
    "nodes_cluster": cluster,
    "nodes_node": node,
    "updates_release": release,
    "updates_updaterun": run,
    "updates_updatelock": lock,
    "updates_maintenancenotice": notice,
    "updates_updateschedule": schedule,
    "hotfixes_contact": contact,
    "hotfixes_hotfixnotice": hotfix,
    "hotfixes_delivery": delivery,
}


def queries(client, url: str, rows: int) -> int:
    with CaptureQueriesContext(connection) as captured:
        page = client.get(url)
    assert page.status_code == 200
    assert page.context["cl"].result_count == rows
    return len(captured)


@pytest.mark.parametrize("name", LISTS)
def test_a_list_page_costs_the_same_queries_for_thirty_rows_as_for_three(admin_client, name):
    make, url = LISTS[name], reverse(f"admin:{name}_changelist")
    model = make().__class__
    for _ in range(2):
        make()
    few = queries(admin_client, url, model.objects.count())
    for _ in range(27):
        make()
    assert queries(admin_client, url, model.objects.count()) == few


def package_of(parent: Release) -> None:
    n = next(_serial)
    parent.packages.create(name=f"pkg{n}", version="1.0", file=f"pool/pkg{n}.tar.gz", size=1, sha256="0" * 64)


def delivery_of(parent: HotfixNotice) -> None:
    Delivery.objects.create(notice=parent, contact=contact(), channel=Delivery.Channel.EMAIL)


def node_of(parent: Cluster) -> None:
    Node.objects.create(hostname=f"n{next(_serial)}", cluster=parent)


# An object page that lists what belongs to the object: a release its packages, a
# hotfix notice its deliveries, a cluster its nodes.
PAGES: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "updates_release": (release, package_of),
    "hotfixes_hotfixnotice": (hotfix, delivery_of),
    "nodes_cluster": (cluster, node_of),
}


def page_queries(client, url: str) -> int:
    client.get(url)  # warm: the first request of a session costs a query more
    with CaptureQueriesContext(connection) as captured:
        page = client.get(url)
    assert page.status_code == 200
    return len(captured)


@pytest.mark.parametrize("name", PAGES)
def test_an_object_page_costs_the_same_queries_for_thirty_related_rows_as_for_three(admin_client, name):
    make, add = PAGES[name]
    parent = make()
    url = reverse(f"admin:{name}_change", args=[parent.pk])
    for _ in range(3):
        add(parent)
    few = page_queries(admin_client, url)
    for _ in range(27):
        add(parent)
    assert page_queries(admin_client, url) == few
