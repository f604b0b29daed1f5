"""The README's picture of the fleet overview, docs/overview.png.

    .venv/bin/python docs/screenshot.py [OUT.png]

The demo fleet (`manage.py demo_fleet`: gw1 and cluster1 of three, the signed demo
repository, the demo users) plus a few more nodes in the states worth seeing (an update
under way and one waiting for its slot, a lock, a download warning, a silent node, one
never reported), served on a loopback port and photographed by Playwright with Debian's
Chromium, logged in as the demo's `admin`. Everything lives in a temporary directory:
its own SQLite database, repository, appliance states and embedded Redis; var/ and a
running `make run` are left alone.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port, redis_server, setup_django  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
WIDTH, HEIGHT = 1280, 900


def main(out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="tgp-screenshot-"))
    os.environ.pop("REDIS_URL", None)  # always a Redis of its own: slots are written below
    os.environ["DJANGO_ALLOWED_HOSTS"] = "127.0.0.1"
    try:
        with redis_server(work):
            setup_django(work / "var")
            password = demo_fleet()
            with serving() as url:
                photograph(url, password, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"written: {out} ({out.stat().st_size // 1024} KiB)")


def demo_fleet() -> str:
    """The demo fleet, as `make run` makes it, and more nodes in states worth seeing."""
    from django.core.management import call_command

    from nodes.demo import demo_password

    call_command("demo_fleet", stdout=io.StringIO())  # its hints are for `make run`
    interesting_states()
    return demo_password()


def interesting_states() -> None:
    from django.conf import settings
    from django.utils import timezone

    from agent.shared.protocol import OUT_PREFIX
    from nodes.models import Cluster, Node
    from updates.models import Release, UpdateLock, UpdateRun, UpdateSchedule, UpdateStep
    from updates.slots import slots_for_url

    now = timezone.now()
    newest = Release.objects.get(version="2.2.0")
    cluster1 = Cluster.objects.get(name="cluster1")
    cluster2 = Cluster.objects.create(name="cluster2", max_parallel_updates=2)

    def node(name: str, version: str = "2.2.0", seen: timedelta | None = timedelta(0), **fields: Any) -> Node:
        return Node.objects.create(
            hostname=name, installed_version=version, last_seen=now - seen if seen is not None else None, **fields
        )

    def run(on: Node, state: str, ago: timedelta, trigger: str = "manual") -> UpdateRun:
        made = UpdateRun.objects.create(node=on, release=newest, state=state, trigger=trigger, version_before="2.1.0")
        UpdateRun.objects.filter(pk=made.pk).update(created_at=now - ago)
        return made

    for i in range(1, 7):
        run(node(f"c2n{i}", cluster=cluster2), "succeeded", timedelta(hours=7, minutes=10 * i), "scheduled")
    run(node("gw2"), "succeeded", timedelta(hours=2), "manual")
    node("gw3")
    node("gw4", version="2.0.0", channel="oldstable")
    node("gw5", version="2.1.0", download_warning=True, download_warning_since=now - timedelta(hours=5))
    node("gw6", seen=timedelta(hours=3))
    node("gw7", version="", seen=None)
    Node.objects.filter(hostname__in=["gw1", "c1n1", "c1n2", "c1n3"]).update(last_seen=now)

    # cluster1 (one slot): c1n1 updating, c1n2 waiting in line for its slot.
    busy = {name: Node.objects.get(hostname=name) for name in ("c1n1", "c1n2")}
    Node.objects.filter(pk__in=[n.pk for n in busy.values()]).update(maintenance_mode=True)
    run(busy["c1n1"], "running", timedelta(minutes=20))
    waiting = run(busy["c1n2"], "running", timedelta(minutes=12))
    UpdateStep.objects.create(run=waiting, name="slot", position=0, state="running", started_at=now)
    slots, places = slots_for_url(settings.REDIS_URL), slots_for_url(settings.REDIS_URL, OUT_PREFIX)
    slots.acquire("cluster1", "c1n1", cluster1.max_parallel_updates)
    for name in busy:
        places.acquire("cluster1", name, cluster1.out_of_lb_bound)

    # gw1's update failed: locked, and in maintenance mode until a member of maint ends it.
    gw1 = Node.objects.get(hostname="gw1")
    Node.objects.filter(pk=gw1.pk).update(maintenance_mode=True)
    failed = run(gw1, "failed", timedelta(hours=3, minutes=25))
    UpdateLock.objects.create(node=gw1, run=failed, reason="install failed: tgpro-browser post-install script")

    UpdateSchedule.objects.create(name="cluster2 nightly", cluster=cluster2, cron="30 2 * * *")
    UpdateSchedule.objects.create(
        name="gw5 one-off", node=Node.objects.get(hostname="gw5"), run_at=now + timedelta(days=1, hours=2)
    )


@contextmanager
def serving() -> Iterator[str]:
    """The admin on a free loopback port, static files included, in a thread of its own."""
    from django.contrib.staticfiles.handlers import StaticFilesHandler
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
    from django.core.wsgi import get_wsgi_application

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # no line per request: the picture is the output

    port = free_port()
    server = ThreadedWSGIServer(("127.0.0.1", port), Quiet)
    server.set_app(StaticFilesHandler(get_wsgi_application()))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def photograph(url: str, password: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
        page.goto(f"{url}/admin/login/?next=/admin/")
        page.fill("#id_username", "admin")
        page.fill("#id_password", password)
        page.click("input[type=submit]")
        page.wait_for_selector("#fleet-overview")
        page.screenshot(path=str(out))
        browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "overview.png")
