"""Notices that say when: a user who logs on during maintenance (or before an announced
one) gets the current notice, and the Auto-Update's "announce now, update at" tells
users now when they will be logged off and starts the update at that time.

The workflow tests run a real control worker, celery beat (control.start_announced_updates
every second, TGP_ANNOUNCED_UPDATE_INTERVAL) and node agents; the others check the
refusals, the claim and cancelling without any agent."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from agent.drivers.simulated import LogonRefused, SimulatedDriver
from agent.shared.protocol import format_time
from nodes import services
from nodes.models import Node
from tests.conftest import ROOT, process_env, wait_for
from updates import announced
from updates.models import MaintenanceNotice, UpdateRun
from updates.runs import locks


def workflow(test):  # type: ignore[no-untyped-def]
    """Real processes, and a database they share with the test."""
    for mark in (pytest.mark.django_db(transaction=True), pytest.mark.workflow, pytest.mark.timeout(180)):
        test = mark(test)
    return test


AUTOUPDATE = reverse("admin:nodes_node_autoupdate")
NOTICES = reverse("admin:updates_maintenancenotice_changelist")
ZONE = "America/New_York"  # not the control plane's zone (Europe/Berlin): the agent writes the time in its own


def driver_of(state_dir: Path, node: Node) -> SimulatedDriver:
    return SimulatedDriver(node.hostname, state_dir / node.hostname)


def inbox(driver: SimulatedDriver, user: str) -> list[str]:
    session = driver.read()["sessions"].get(user)
    return [n["message"] for n in session["inbox"]] if session else []


def log_on_by_cli(redis_url: str, state_dir: Path, hostname: str, user: str) -> subprocess.CompletedProcess[str]:
    env = process_env(redis_url, TGP_NODE_STATE_DIR=str(state_dir), TGP_NODE_DRIVER="simulated")
    return subprocess.run(
        [sys.executable, "-m", "agent", "simulate-logon", hostname, user],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


# --- logon during maintenance (the appliance) -------------------------------------


def test_a_user_who_logs_on_during_maintenance_gets_the_current_notice_until_resume(make_node, state_dir, db):
    node = make_node("gw", users=("alice",))
    driver = driver_of(state_dir, node)
    driver.notify("run-7", "Updating now: you will be logged off shortly.")

    assert [n["message"] for n in driver.log_on("carol")] == ["Updating now: you will be logged off shortly."]
    assert inbox(driver, "carol") == inbox(driver, "alice") == ["Updating now: you will be logged off shortly."]
    driver.drain(7)
    with pytest.raises(LogonRefused, match="logon is off"):
        driver.log_on("dave")
    assert "dave" not in driver.read()["sessions"], "nobody logs on to a drained node"
    driver.resume()
    assert driver.log_on("erin") == [], "after maintenance nobody is told of it"


def test_a_user_who_logs_on_before_an_announced_maintenance_gets_it_and_not_after_its_time(make_node, state_dir, db):
    node = make_node("gw", users=())
    driver = driver_of(state_dir, node)
    driver.deliver_notice("notice-1", "Maintenance at 03:00", at=time.time() + 3600)
    assert [n["message"] for n in driver.log_on("carol")] == ["Maintenance at 03:00"]
    driver.deliver_notice("notice-2", "Maintenance at 02:00", at=time.time() - 1)
    assert driver.log_on("dave") == [], "a plain announcement whose time has passed is history"
    driver.deliver_notice("notice-3", "Maintenance at 04:00", at=time.time() + 3600)
    driver.resume()  # maintenance ended (node.end_maintenance): the appliance forgets the notice
    assert driver.log_on("erin") == []


@workflow
def test_the_agent_remembers_an_announcement_and_a_user_who_logs_on_later_gets_it_with_the_time(
    make_node, agent_for, state_dir, redis_url, staff
):
    node = make_node("gw", users=("alice",))
    agent_for(node, TGP_TIME_ZONE=ZONE)
    starts = timezone.now() + timedelta(hours=2)
    services.announce([node], "Maintenance {when}, please save your work", starts, staff("op", "update"))
    told = f"Maintenance at {format_time(starts.timestamp(), ZONE)}, please save your work"
    wait_for(lambda: inbox(driver_of(state_dir, node), "alice") == [told], 30, "the notice with its time")

    logon = log_on_by_cli(redis_url, state_dir, node.hostname, "carol")
    assert logon.returncode == 0, logon.stderr
    assert [n["message"] for n in json.loads(logon.stdout)] == [told]
    assert told.endswith("please save your work") and ("EST" in told or "EDT" in told)


# --- announce now, update at: the whole way ----------------------------------------


@workflow
def test_announce_now_update_at_tells_users_the_time_now_and_updates_at_that_time(
    client, demo_repo, make_node, agent_for, beat, wait_run, state_dir, redis_url, staff
):
    repo, _ = demo_repo
    repo.import_releases()
    node = make_node("gw", users=("alice",))
    agent_for(node, TGP_TIME_ZONE=ZONE)
    operator = staff("op", "update")
    client.force_login(operator)
    update_at = (timezone.now() + timedelta(seconds=8)).replace(microsecond=0)

    response = client.post(AUTOUPDATE, announce_form(node, update_at))
    assert response.status_code == 302, response.content
    notice = MaintenanceNotice.objects.get(node=node)
    assert notice.state == "pending" and notice.release.version == "2.2.0" and notice.starts_at == update_at

    driver = driver_of(state_dir, node)
    when = format_time(update_at.timestamp(), ZONE)
    told = wait_for(lambda: inbox(driver, "alice"), 30, "the announcement")
    assert len(told) == 1 and f"updated to version 2.2.0 at {when}" in told[0], told
    logon = log_on_by_cli(redis_url, state_dir, node.hostname, "carol")  # before the time: told at logon
    assert logon.returncode == 0 and [n["message"] for n in json.loads(logon.stdout)] == told
    assert timezone.now() < update_at, "the test got here in time (else raise the delay)"
    assert not UpdateRun.objects.filter(node=node).exists(), "nothing starts before the time"
    assert set(driver.read()["sessions"]) == {"alice", "carol"} and driver.read()["logon_enabled"]

    run = wait_for(lambda: UpdateRun.objects.filter(node=node).first(), 30, "the update to start at its time")
    assert run.created_at >= update_at and run.started_by == operator and run.trigger == "manual"
    run = wait_run(run, "succeeded")
    notice.refresh_from_db()
    assert notice.state == "started" and notice.run == run and notice.decided_at >= update_at
    for entry in driver.read()["logged_off"]:
        assert entry["at"] >= update_at.isoformat(timespec="seconds"), "nobody was logged off before the time"
        # First the announcement with the time, then the run's own notice: "shortly".
        messages = [n["message"] for n in entry["inbox"]]
        assert messages[0] == told[0] and "updated to version 2.2.0 shortly" in messages[1], messages
    assert driver.log_on("dave") == [], "after the update nobody is told of it"


@workflow
def test_a_cancelled_announcement_tells_users_it_is_off_and_never_starts(
    client, demo_repo, make_node, agent_for, state_dir, staff
):
    repo, _ = demo_repo
    repo.import_releases()
    node = make_node("gw", users=("alice",))
    agent_for(node, TGP_TIME_ZONE=ZONE)
    update_at = timezone.now() + timedelta(hours=2)
    (notice,), refused = services.announce_planned(services.plan_updates([node]), update_at, staff("op", "update"))
    driver = driver_of(state_dir, node)
    wait_for(lambda: len(inbox(driver, "alice")) == 1, 30, "the announcement")

    client.force_login(staff("op2", "update"))
    response = client.post(NOTICES, {"action": "cancel", "_selected_action": [notice.pk]})
    assert response.status_code == 302
    notice.refresh_from_db()
    assert notice.state == "cancelled" and "op2" in notice.outcome
    off = wait_for(lambda: inbox(driver, "alice")[1:], 30, "the notice that it is off")
    when = format_time(update_at.timestamp(), ZONE)
    assert off == [f"The maintenance planned at {when} is off: you will not be logged off then."]
    assert driver.log_on("carol") == [], "users who log on later are not told of a cancelled update"
    assert announced.start_due(update_at + timedelta(seconds=1)) == []
    assert not UpdateRun.objects.filter(node=node).exists()


# --- refusals, the claim, the command ----------------------------------------------


@pytest.fixture
def gw(make_node, releases):
    node = make_node("gw", users=("alice",))
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0", logged_in_users=["alice"])
    return Node.objects.get(pk=node.pk)


def announce_form(node: Node, update_at) -> dict:  # type: ignore[no-untyped-def]
    return {
        "ids": node.pk, "confirm": "yes", "when": "at",
        "update_at": timezone.localtime(update_at).strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("delay", "error"), [(timedelta(minutes=-5), "lies in the past"), (timedelta(days=8), "more than 7 days ahead")]
)
def test_an_update_time_in_the_past_or_too_far_ahead_is_refused_and_nothing_is_announced(
    client, staff, gw, delay, error, django_capture_on_commit_callbacks
):
    client.force_login(staff("op", "update"))
    with django_capture_on_commit_callbacks() as queued:
        page = client.post(AUTOUPDATE, announce_form(gw, timezone.now() + delay))
    assert page.status_code == 200 and error in page.text
    assert not MaintenanceNotice.objects.exists() and not UpdateRun.objects.exists() and queued == []
    assert not Node.objects.get(pk=gw.pk).maintenance_mode


@pytest.mark.django_db
@pytest.mark.parametrize("group", [None, "maint"])
def test_announcing_an_update_needs_the_update_group(client, staff, gw, group):
    client.force_login(staff("someone", group))
    response = client.post(AUTOUPDATE, announce_form(gw, timezone.now() + timedelta(hours=2)))
    assert response.status_code == 403
    assert not MaintenanceNotice.objects.exists()


@pytest.mark.django_db
def test_a_locked_node_is_refused_with_its_reason_and_nothing_is_announced(
    client, staff, gw, django_capture_on_commit_callbacks
):
    locks.set_lock(gw, "download failed")
    client.force_login(staff("op", "update"))
    with django_capture_on_commit_callbacks() as queued:
        response = client.post(AUTOUPDATE, announce_form(gw, timezone.now() + timedelta(hours=2)), follow=True)
    assert "update lock (download failed)" in response.text
    assert not MaintenanceNotice.objects.exists() and queued == []


@pytest.mark.django_db
def test_a_second_announcement_of_the_same_node_is_refused_until_the_first_is_cancelled(gw, staff):
    op = staff("op", "update")
    plans = services.plan_updates([gw])
    first, _ = services.announce_planned(plans, timezone.now() + timedelta(hours=2), op)
    again, refused = services.announce_planned(plans, timezone.now() + timedelta(hours=3), op)
    assert again == [] and "announced for" in refused[0] and "cancel it first" in refused[0]
    assert announced.cancel(first, op) == 1
    assert announced.cancel(first, op) == 0, "cancelled once"
    assert services.announce_planned(plans, timezone.now() + timedelta(hours=3), op)[0]


@pytest.mark.django_db
def test_a_refusal_at_the_update_time_stays_on_the_notice_and_in_the_log(gw, staff, caplog):
    update_at = timezone.now() + timedelta(hours=2)
    (notice,), _ = services.announce_planned(services.plan_updates([gw]), update_at, staff("op", "update"))
    locks.set_lock(gw, "set after the announcement")
    with caplog.at_level(logging.WARNING, logger="updates.announced"):
        (line,) = announced.start_due(update_at + timedelta(seconds=2))
    notice.refresh_from_db()
    assert notice.state == "refused" and "set after the announcement" in notice.outcome
    assert "set after the announcement" in line and "set after the announcement" in caplog.text
    assert not UpdateRun.objects.filter(node=gw).exists()


@pytest.mark.django_db
def test_an_announced_update_is_not_started_before_its_time_and_only_once(
    gw, staff, django_capture_on_commit_callbacks
):
    op = staff("op", "update")
    update_at = timezone.now() + timedelta(hours=2)
    (notice,), _ = services.announce_planned(services.plan_updates([gw]), update_at, op)
    assert announced.start_due(update_at - timedelta(seconds=1)) == []
    with django_capture_on_commit_callbacks():
        assert announced.start_due(update_at) == [f"{gw}: run {UpdateRun.objects.get().pk} started"]
        assert announced.start_due(update_at + timedelta(seconds=1)) == []
        assert announced.start_announced(notice.pk, update_at) == "", "a second claim finds it started"
    run = UpdateRun.objects.get()
    assert run.started_by == op and run.release.version == "2.2.0"
    notice.refresh_from_db()
    assert notice.state == "started" and notice.run == run


@pytest.mark.django_db
def test_an_announced_update_that_missed_its_time_is_refused_not_started_late(gw, staff, settings):
    update_at = timezone.now() + timedelta(hours=2)
    (notice,), _ = services.announce_planned(services.plan_updates([gw]), update_at, staff("op", "update"))
    settings.TGP_ANNOUNCED_UPDATE_GRACE = 900
    announced.start_due(update_at + timedelta(hours=1))
    notice.refresh_from_db()
    assert notice.state == "refused" and "60 minutes ago" in notice.outcome
    assert not UpdateRun.objects.exists()


@pytest.mark.django_db
def test_cancelling_needs_the_update_group(client, staff, gw):
    (notice,), _ = services.announce_planned(
        services.plan_updates([gw]), timezone.now() + timedelta(hours=2), staff("op", "update")
    )
    client.force_login(staff("maintainer", "maint"))
    response = client.post(NOTICES, {"action": "cancel", "_selected_action": [notice.pk]})
    assert response.status_code == 403
    assert MaintenanceNotice.objects.get(pk=notice.pk).state == "pending"


@pytest.mark.django_db
def test_the_node_page_and_the_list_show_pending_announcements(client, staff, gw):
    op = staff("op", "update")
    services.announce_planned(services.plan_updates([gw]), timezone.now() + timedelta(hours=2), op)
    client.force_login(op)
    page = client.get(reverse("admin:nodes_node_change", args=[gw.pk]))
    assert "Update to 2.2.0 at" in page.text
    listing = client.get(NOTICES + "?state__exact=pending")
    assert gw.hostname in listing.text and "Update announced" in listing.text


@pytest.mark.django_db
def test_autoupdate_command_announces_with_in_and_refuses_a_time_in_the_past(gw):
    with pytest.raises(CommandError, match="lies in the past"):
        call_command("autoupdate", gw.hostname, "--yes", "--at", "2001-01-01T03:00")
    with pytest.raises(CommandError, match="not a duration"):
        call_command("autoupdate", gw.hostname, "--yes", "--in", "soon")
    assert not MaintenanceNotice.objects.exists()

    from io import StringIO

    out = StringIO()
    call_command("autoupdate", gw.hostname, "--yes", "--in", "2h", stdout=out)
    notice = MaintenanceNotice.objects.get(node=gw)
    assert notice.state == "pending" and f"notice {notice.pk}: {gw} -> 2.2.0 at" in out.getvalue()
    assert timedelta(minutes=119) < notice.starts_at - timezone.now() <= timedelta(hours=2)
    assert not UpdateRun.objects.exists(), "announced, not started"
