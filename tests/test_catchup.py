"""Catching up on an omitted update from Oldstable: a partial update changes
exactly the chosen packages, a full update the whole release."""

from __future__ import annotations

import pytest
from django.urls import reverse

from agent.drivers.simulated import SimulatedDriver
from nodes import services
from nodes.models import Node
from updates.models import UpdateRun
from updates.runs import start


def installed(state_dir, node) -> dict[str, str]:
    return SimulatedDriver(node.hostname, state_dir / node.hostname).read()["packages"]


def version_file(state_dir, node, package) -> str:
    return (state_dir / node.hostname / "current" / package / "VERSION").read_text().strip()


@pytest.mark.workflow
@pytest.mark.timeout(180)
@pytest.mark.django_db(transaction=True)
def test_partial_catchup_changes_exactly_the_chosen_packages(demo_repo, make_node, agent_for, wait_run, state_dir):
    repo, _ = demo_repo
    repo.import_releases()
    node = make_node("gw")
    agent_for(node)
    before = installed(state_dir, node)

    run = services.start_catchup(Node.objects.get(pk=node.pk), None, ["tgpro-vnc"])
    wait_run(run, "succeeded")

    after = installed(state_dir, node)
    assert after == {**before, "tgpro-vnc": "2.0.0"}
    assert version_file(state_dir, node, "tgpro-vnc") == "2.0.0"
    assert version_file(state_dir, node, "tgpro-browser") == before["tgpro-browser"]
    node.refresh_from_db()
    assert node.installed_version == "2.1.0", "a partial update leaves the release version alone"
    assert node.installed_packages == after and not node.maintenance_mode


@pytest.mark.workflow
@pytest.mark.timeout(180)
@pytest.mark.django_db(transaction=True)
def test_full_catchup_installs_the_whole_oldstable_release(demo_repo, make_node, agent_for, wait_run, state_dir):
    repo, _ = demo_repo
    repo.import_releases()
    node = make_node("gw")
    agent_for(node)

    run = services.start_catchup(Node.objects.get(pk=node.pk), None)
    wait_run(run, "succeeded")

    assert installed(state_dir, node) == {"tgpro-base": "2.0.0", "tgpro-browser": "2.0.0", "tgpro-vnc": "2.0.0"}
    node.refresh_from_db()
    assert node.installed_version == "2.0.0"
    assert run.trigger == UpdateRun.Trigger.CATCHUP_FULL


@pytest.mark.django_db
def test_single_packages_only_come_from_a_partial_catchup(make_node, releases):
    node = make_node("gw")
    with pytest.raises(start.UpdateRefused, match="Only a partial update"):
        start.start_update(node, releases["2.2.0"], packages=["tgpro-vnc"])
    with pytest.raises(start.UpdateRefused, match="Not in release 2.0.0: evil"):
        services.start_catchup(node, None, ["tgpro-vnc", "evil"])
    assert not UpdateRun.objects.exists()


@pytest.mark.django_db
def test_catchup_page_is_for_the_update_group_and_rejects_bad_input(client, staff, make_node, releases):
    node = make_node("gw", users=("alice",))
    Node.objects.filter(pk=node.pk).update(logged_in_users=["alice"])
    url = reverse("admin:nodes_node_catchup", args=[node.pk])
    client.force_login(staff("maintainer", "maint"))
    assert client.get(url).status_code == 403
    client.logout()
    client.force_login(staff("op", "update"))
    page = client.get(url)
    assert page.status_code == 200 and "2.0.0" in page.text and "alice" in page.text

    no_packages = client.post(url, {"mode": "partial"})
    assert "Choose the packages" in no_packages.text
    hostile = client.post(url, {"mode": "partial", "packages": ["../../etc/passwd"]})
    assert "Select a valid choice" in hostile.text
    assert not UpdateRun.objects.exists()


@pytest.mark.django_db
def test_catchup_page_starts_a_partial_run(client, staff, make_node, releases, django_capture_on_commit_callbacks):
    node = make_node("gw")
    client.force_login(staff("op", "update"))
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post(
            reverse("admin:nodes_node_catchup", args=[node.pk]), {"mode": "partial", "packages": ["tgpro-base"]}
        )
    run = UpdateRun.objects.get(node=node)
    assert response.status_code == 302
    assert run.trigger == UpdateRun.Trigger.CATCHUP_PARTIAL and run.packages == ["tgpro-base"]


@pytest.mark.django_db
def test_a_hotfix_release_is_what_autoupdate_and_the_next_scheduled_update_install(make_node, releases):
    from updates import scheduled
    from updates.models import Package, Release

    hotfix = Release.objects.create(version="2.2.1", channel="stable", hotfix=True, needs_reboot=False)
    Package.objects.create(
        release=hotfix, name="tgpro-browser", version="2.2.1", file="pool/tgpro-browser_2.2.1.tar.gz",
        size=1, sha256="0" * 64,
    )  # fmt: skip
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(installed_version="2.2.0")
    node.refresh_from_db()
    (plan,) = services.plan_updates([node])
    assert plan.release == hotfix
    assert scheduled.updates_for(node) == hotfix
    Node.objects.filter(pk=node.pk).update(installed_version="2.2.1")
    node.refresh_from_db()
    assert scheduled.updates_for(node) is None, "installed by hand already: the schedule finds nothing to do"
