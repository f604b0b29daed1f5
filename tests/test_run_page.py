"""The run page: each step's start, end and duration, and its live progress (a
fragment the page's small script fetches; without JavaScript the page reloads)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from updates.models import UpdateRun, UpdateStep
from updates.run_page import format_duration

pytestmark = pytest.mark.django_db


@pytest.fixture
def run(running_run):
    return running_run


def _step(run, name, **fields):
    UpdateStep.objects.filter(run=run, name=name).update(**fields)


def _cell(html, name, column):
    row = html.split(f'id="step-{name}"', 1)[1].split("</tr>", 1)[0]
    return row.split(f'class="step-{column}">', 1)[1].split("</td>", 1)[0]


def test_run_page_shows_each_steps_start_end_and_duration(admin_client, run):
    began = timezone.now() - timedelta(minutes=2)
    _step(run, "notify", state="succeeded", started_at=began, finished_at=began + timedelta(seconds=4.2))
    _step(run, "download", state="running", started_at=began + timedelta(seconds=5))

    html = admin_client.get(reverse("admin:updates_updaterun_change", args=[run.pk])).text

    assert _cell(html, "notify", "duration") == "4.2 s"
    assert f"{timezone.localtime(began):%H:%M:%S}</time>" in _cell(html, "notify", "started")
    assert f"{timezone.localtime(began + timedelta(seconds=4.2)):%H:%M:%S}</time>" in _cell(html, "notify", "ended")
    assert _cell(html, "download", "duration").endswith("so far"), "a running step shows how long it has run"
    assert _cell(html, "download", "ended") == ""
    assert _cell(html, "install", "started") == "" and _cell(html, "install", "duration") == ""


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.04, "0.0 s"),
        (4.25, "4.2 s"),
        (59.9, "59.9 s"),
        (65, "1 min 05 s"),
        (3599, "59 min 59 s"),
        (7380, "2 h 03 min"),
    ],
)
def test_durations_read_as_seconds_minutes_or_hours(seconds, shown):
    assert format_duration(timedelta(seconds=seconds)) == shown


def test_a_running_runs_page_updates_itself_with_a_script_and_without_one(admin_client, run):
    url = reverse("admin:updates_updaterun_change", args=[run.pk])
    html = admin_client.get(url).text
    assert "updates/run_progress.js" in html
    assert '<noscript><meta http-equiv="refresh" content="2"></noscript>' in html
    assert reverse("admin:updates_updaterun_progress", args=[run.pk]) in html

    UpdateRun.objects.filter(pk=run.pk).update(state="succeeded")
    html = admin_client.get(url).text
    assert "run_progress.js" not in html and 'http-equiv="refresh"' not in html, "a finished run's page stays still"


def test_the_progress_fragment_is_the_runs_current_state(admin_client, run):
    url = reverse("admin:updates_updaterun_progress", args=[run.pk])
    first = admin_client.get(url)
    assert first.status_code == 200
    assert 'data-running="true"' in first.text and "<html" not in first.text

    _step(run, "notify", state="succeeded", detail="notice sent to 2 users")
    _step(run, "download", state="running", bytes_done=256, bytes_total=1024, started_at=timezone.now())
    later = admin_client.get(url).text
    assert "notice sent to 2 users" in later
    assert '<progress max="100" value="25">' in later

    UpdateRun.objects.filter(pk=run.pk).update(state="failed", error="install failed: disk full")
    done = admin_client.get(url).text
    assert 'data-running="false"' in done, "the script stops polling a finished run"
    assert "install failed: disk full" in done


def test_the_progress_fragment_needs_a_login_and_the_view_permission(client, staff, run):
    url = reverse("admin:updates_updaterun_progress", args=[run.pk])
    anonymous = client.get(url)
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]

    staff_without_view = staff("nobody")
    staff_without_view.user_permissions.clear()
    client.force_login(staff_without_view)
    assert client.get(url).status_code == 403

    client.force_login(staff("viewer-run"))
    assert client.get(url).status_code == 200
    assert client.get(reverse("admin:updates_updaterun_progress", args=[run.pk + 1000])).status_code == 404


def test_polling_the_progress_costs_a_few_queries(admin_client, run, django_assert_max_num_queries):
    # Every open run page asks every 2 s: the session, the user, the run and its steps.
    url = reverse("admin:updates_updaterun_progress", args=[run.pk])
    with django_assert_max_num_queries(4):
        assert admin_client.get(url).status_code == 200
