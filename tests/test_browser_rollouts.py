"""A rollout's page in a real browser (tests/test_browser.py's Playwright and Chromium):
group `update` pauses, resumes and cancels a rollout with its buttons. Its runs wait
before their update slot; no worker or agent is needed for that."""

from __future__ import annotations

import re

import pytest

from tests.test_browser import expect, login, page  # noqa: F401  (fixtures; skips this module as it skips its own)
from tests.test_rollouts import cluster_of, start
from updates.models import Rollout, UpdateRun

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.workflow, pytest.mark.timeout(120)]


def test_pause_resume_and_cancel_a_rollout_from_its_page(page, login, live_server, staff, releases):  # noqa: F811
    runs = start(cluster_of(3))
    rollout = Rollout.objects.get(pk=runs[0].rollout_id)
    staff("op", "update")

    login("op")
    page.goto(f"{live_server.url}/admin/updates/rollout/{rollout.pk}/change/")
    state, actions = page.locator("#rollout-state"), page.locator("#rollout-actions")
    expect(state).to_have_text("Running")
    expect(page.locator("#rollout-progress td.waiting")).to_have_text("3")
    expect(page.locator("#rollout-runs tbody tr")).to_have_count(3)

    actions.get_by_role("button", name="Pause").click()
    expect(page.locator("ul.messagelist li.success")).to_contain_text(f"Paused the {rollout}")
    expect(state).to_have_text("Paused")
    expect(page.locator("#rollout-reason")).to_contain_text("paused by op")
    expect(actions.get_by_role("button", name="Pause")).to_have_count(0)

    actions.get_by_role("button", name="Resume").click()
    expect(page.locator("ul.messagelist li.success")).to_contain_text(f"Resumed the {rollout}")
    expect(state).to_have_text("Running")
    assert Rollout.objects.get(pk=rollout.pk).state == "running"

    actions.get_by_role("button", name="Cancel the nodes not yet started").click()
    expect(page.locator("ul.messagelist li.success")).to_contain_text("3 node(s) not yet started were called off")
    expect(state).to_have_text("Cancelled")
    expect(page.locator("#rollout-progress td.cancelled")).to_have_text("3")
    expect(page.locator("#rollout-runs td.run-state")).to_have_text(["Cancelled"] * 3)
    expect(page.locator("#rollout-actions")).to_have_count(0)
    assert set(UpdateRun.objects.filter(rollout=rollout).values_list("state", flat=True)) == {"cancelled"}
    page.get_by_role("link", name=re.compile(rf"^run {runs[0].pk}$")).click()
    expect(page).to_have_url(re.compile(rf"/admin/updates/updaterun/{runs[0].pk}/change/$"))
