"""The admin in a real browser: Playwright driving Debian's Chromium against
pytest-django's live server, with a real control worker and node agent behind it.

Needs `pip install playwright` and `apt-get install chromium`; skipped otherwise.
Never `playwright install`: the browser is the system's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")
expect = sync_api.expect

from nodes.models import Node  # noqa: E402  (after the skips: no Django import for a skipped module)
from updates.runs import locks  # noqa: E402

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workflow, pytest.mark.timeout(240)]

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PASSWORD = "pw-for-tests-only"


@pytest.fixture
def page(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    # Playwright's sync API keeps an asyncio loop running in this thread, so Django
    # takes every ORM call the test makes after this point (fixtures, wait_for, set_lock)
    # for one from async code and raises SynchronousOnlyOperation. The calls really are
    # synchronous; the live server answers from its own thread, untouched by this.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context()
        context.set_default_timeout(15_000)
        yield context.new_page()
        context.close()
        browser.close()
        # Inside sync_playwright the ORM runs in Playwright's greenlet, with context
        # variables of its own, so Django opened a database connection for that context.
        # Close it here: left open, it keeps PostgreSQL from dropping the test database.
        from django.db import connections

        connections.close_all()


@pytest.fixture
def page_without_js(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """As `page`, with JavaScript switched off in the browser."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(java_script_enabled=False)
        context.set_default_timeout(15_000)
        yield context.new_page()
        context.close()
        browser.close()
        from django.db import connections

        connections.close_all()


@pytest.fixture
def login(page: Any, live_server: Any) -> Callable[[str], None]:
    def log_in(username: str) -> None:
        page.goto(f"{live_server.url}/admin/")
        page.fill("#id_username", username)
        page.fill("#id_password", PASSWORD)
        page.click("input[type=submit]")
        expect(page.locator("#user-tools")).to_contain_text(username)

    return log_in


def ask_for_autoupdate(page, live_server, node) -> None:
    """The node list's Auto-Update action for one node: its confirmation page opens."""
    page.goto(f"{live_server.url}/admin/nodes/node/")
    page.check(f"input.action-select[value='{node.pk}']")
    page.select_option("select[name=action]", label="Auto-Update (asks for confirmation)")
    page.click("button[name=index]")


def test_autoupdate_from_the_node_list_until_succeeded(
    page, login, live_server, staff, demo_repo, make_node, agent_for, tmp_path
):
    repo, _ = demo_repo
    repo.import_releases()
    node = make_node("gw", users=("alice", "bob"))
    agent_for(node)
    staff("op", "update")

    login("op")
    ask_for_autoupdate(page, live_server, node)

    plan = page.locator("#autoupdate-plan")
    expect(plan).to_contain_text(node.hostname)
    expect(plan.locator("td.users")).to_have_text("alice, bob")
    page.click("input[type=submit][value^='Yes, log these users off']")

    expect(page).to_have_url(re.compile(r"/admin/updates/updaterun/\d+/change/$"))
    # The run page reloads itself every 2 s while the run is running.
    expect(page.locator("#run-state")).to_contain_text("Succeeded", timeout=120_000)
    expect(page.locator("#step-resume .step-state")).to_have_text("Succeeded")

    shot = tmp_path / "run-succeeded.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_remove_update_lock_from_the_node_page(page, login, live_server, staff, make_node):
    node = make_node("gw")
    locks.set_lock(node, "download failed: checksum mismatch")
    staff("op", "update")

    login("op")
    page.goto(f"{live_server.url}/admin/nodes/node/{node.pk}/change/")
    lock = page.locator("#update-lock")
    expect(lock).to_contain_text("Locked since")
    lock.get_by_role("button", name="Remove update lock").click()

    expect(page.locator("ul.messagelist li.success")).to_contain_text(f"Removed the update lock of {node.hostname}")
    expect(lock).to_contain_text("No update lock.")
    expect(lock).to_contain_text("Removed locks:")
    expect(lock.locator("li")).to_contain_text("download failed: checksum mismatch")
    assert not locks.active_lock(node)


def test_download_warning_shows_in_the_title_bar_of_every_page(page, login, live_server, staff, make_node):
    node = make_node("gw")
    Node.objects.filter(pk=node.pk).update(download_warning=True)
    staff("op", "update")

    login("op")
    for path in ("/admin/", "/admin/nodes/node/", f"/admin/nodes/node/{node.pk}/change/", "/admin/updates/updaterun/"):
        page.goto(f"{live_server.url}{path}")
        expect(page.locator("#header")).to_contain_text("Update download error")


def test_autoupdate_page_announces_now_and_updates_at_the_time_it_offers(
    page, login, live_server, staff, make_node, releases
):
    from django.utils import timezone

    from updates.models import MaintenanceNotice, UpdateRun

    node = make_node("gw", users=("alice",))
    Node.objects.filter(pk=node.pk).update(installed_version="2.1.0", logged_in_users=["alice"])
    staff("op", "update")

    login("op")
    ask_for_autoupdate(page, live_server, node)

    announce = page.locator("#announce-update")
    offered = announce.locator("input[name=update_at]").input_value()  # the manual's advice: in about 2 hours
    announce.get_by_role("button", name="Announce now, update at this time").click()

    expect(page.locator("ul.messagelist li.success")).to_contain_text("Update announced on 1 node(s)")
    expect(page.locator("#result_list")).to_contain_text(node.hostname)
    notice = MaintenanceNotice.objects.get(node=node)
    assert notice.state == "pending" and offered.startswith(f"{timezone.localtime(notice.starts_at):%Y-%m-%d %H:%M}")
    assert not UpdateRun.objects.filter(node=node).exists()


def test_the_plan_page_works_without_javascript(page_without_js, live_server, staff, make_node, releases):
    from datetime import timedelta

    from django.utils import timezone

    from nodes.models import Cluster
    from updates.models import PlanEntry, UpdateSchedule

    page = page_without_js
    cluster = Cluster.objects.create(name="web", max_parallel_updates=2, expected_update=timedelta(minutes=30))
    nodes = sorted((make_node("gw", cluster=cluster) for _ in range(4)), key=lambda n: n.hostname)
    occurrence = (timezone.localtime() + timedelta(days=2)).replace(hour=3, minute=0, second=0, microsecond=0)
    schedule = UpdateSchedule.objects.create(name="nightly", cluster=cluster, run_at=occurrence)
    staff("op", "update")

    page.goto(f"{live_server.url}/admin/")
    page.fill("#id_username", "op")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.goto(f"{live_server.url}/admin/updates/updateschedule/{schedule.pk}/change/")
    picture = page.locator("svg.plan-timeline")
    expect(picture).to_be_visible()
    expect(picture.locator("rect.planned-off")).to_have_count(4)
    row = page.locator(f"tr[data-node='{nodes[2].hostname}']")
    expect(row.locator("td.planned-at")).to_have_text(f"{occurrence + timedelta(minutes=30):%Y-%m-%d %H:%M:%S}")

    later = occurrence + timedelta(hours=2)
    row.locator("input[name=planned_at]").fill(f"{later:%Y-%m-%dT%H:%M:%S}")
    row.get_by_role("button", name="Move").click()
    expect(page.locator("ul.messagelist li.success")).to_contain_text(
        re.compile(f"{nodes[2].hostname} now updates at", re.I)
    )
    row = page.locator(f"tr[data-node='{nodes[2].hostname}']")
    expect(row.locator("td.planned-at")).to_have_text(f"{later:%Y-%m-%d %H:%M:%S}")
    assert PlanEntry.objects.get(node=nodes[2]).planned_at == later


def test_the_run_page_shows_progress_in_place_without_reloading(page, login, live_server, staff, running_run):
    from django.utils import timezone

    from updates.models import UpdateRun, UpdateStep

    run = running_run
    staff("op", "update")
    login("op")
    page.goto(f"{live_server.url}/admin/updates/updaterun/{run.pk}/change/")
    expect(page.locator("#step-notify .step-state")).to_have_text("Pending")
    page.evaluate("window.loadedOnce = true")  # gone if the page reloads

    now = timezone.now()
    UpdateStep.objects.filter(run=run, name="notify").update(state="succeeded", started_at=now, finished_at=now)
    UpdateStep.objects.filter(run=run, name="download").update(
        state="running", started_at=now, bytes_done=300, bytes_total=1000
    )
    expect(page.locator("#step-notify .step-state")).to_have_text("Succeeded")
    expect(page.locator("#step-notify .step-duration")).to_have_text("0.0 s")
    expect(page.locator("#step-download progress")).to_have_attribute("value", "30")
    assert page.evaluate("window.loadedOnce") is True, "the steps changed in place: the page did not reload"

    UpdateRun.objects.filter(pk=run.pk).update(state="succeeded", finished_at=timezone.now())
    expect(page.locator("#run-state")).to_contain_text("Succeeded")
    # Finished: the page loaded once more, so the run's own fields are final too.
    expect(page.locator(".field-state .readonly")).to_have_text("Succeeded")


def test_the_run_page_reloads_itself_without_javascript(page_without_js, live_server, staff, running_run):
    from updates.models import UpdateStep

    page = page_without_js
    run = running_run
    staff("op", "update")
    page.goto(f"{live_server.url}/admin/")
    page.fill("#id_username", "op")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.goto(f"{live_server.url}/admin/updates/updaterun/{run.pk}/change/")
    expect(page.locator("#step-notify .step-state")).to_have_text("Pending")

    UpdateStep.objects.filter(run=run, name="notify").update(state="succeeded")
    expect(page.locator("#step-notify .step-state")).to_have_text("Succeeded")
