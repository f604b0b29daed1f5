"""Hotfix notices: who is told, over which channel, and that nobody is told twice.

Real parts only: an SMTP server (aiosmtpd) and an HTTP server in Twilio's role on
loopback. Most tests run the delivery task in-process (Celery eager mode, on-commit
callbacks executed); the ``workflow`` tests go through the real control worker.

The control worker is a session fixture started with this process's environment,
so the loopback servers it must reach listen on ports chosen at import time (before
any test runs) and announced through the TGP_* variables that settings.py reads.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest
from aiosmtpd.controller import Controller
from django.contrib.auth.models import Group, Permission, User
from django.core.exceptions import ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from hotfixes import services
from hotfixes import tasks as hotfix_tasks
from hotfixes.models import Contact, HotfixNotice
from nodes.models import Cluster, Node
from tests.conftest import HOTFIX, wait_for
from tgpadmin.celery import app as celery_app
from updates.models import Package, Release

# The session's control worker is configured for these providers (tests/conftest.py).
SID, TOKEN, FROM_NUMBER = HOTFIX.twilio_sid, HOTFIX.twilio_token, HOTFIX.twilio_from
SMTP_PORT, PHONE_PORT = HOTFIX.smtp_port, HOTFIX.phone_port
WORKER_MAX_RETRIES = HOTFIX.worker_max_retries
WEBHOOK_TOKEN = "hook-" + uuid.uuid4().hex

_serial = iter(range(1, 10**6))


# --- loopback servers ----------------------------------------------------------------


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    message: email.message.EmailMessage

    def part(self, content_type: str) -> str:
        found = next(p for p in self.message.walk() if p.get_content_type() == content_type)
        return str(found.get_content())  # type: ignore[attr-defined]


class SmtpCollector:
    """aiosmtpd handler: keeps every message, refuses the addresses in ``refuse``."""

    def __init__(self) -> None:
        self.messages: list[Mail] = []
        self.refuse: dict[str, str] = {}

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), message))  # type: ignore[arg-type]
        return "250 Message accepted for delivery"

    def reset(self) -> None:
        self.messages.clear()
        self.refuse.clear()


@dataclass
class PhoneProvider:
    """What the HTTP server in Twilio's (and the webhook's) role saw and how it answers."""

    status: int = 201
    requests: list[dict[str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        self.status = 201
        self.requests.clear()

    def twilio(self, resource: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == f"/2010-04-01/Accounts/{SID}/{resource}.json"]


class _PhoneHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    expected_auth = "Basic " + base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        provider: PhoneProvider = self.server.provider  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        auth = self.headers.get("Authorization", "")
        is_json = self.headers.get("Content-Type", "").startswith("application/json")
        provider.requests.append(
            {
                "path": self.path,
                "auth": auth,
                "form": {} if is_json else {k: v[0] for k, v in parse_qs(raw.decode()).items()},
                "json": json.loads(raw) if is_json else None,
            }
        )
        if provider.status >= 400:
            # A careless provider echoing the request: the credentials must still not reach last_error.
            self._answer(provider.status, {"code": 20003, "message": f"failing for {self.path} ({auth})"})
        elif self.path.startswith("/2010-04-01/") and auth != self.expected_auth:
            self._answer(401, {"code": 20003, "message": "Authenticate"})
        elif self.path.startswith("/2010-04-01/"):
            prefix = "CA" if self.path.endswith("/Calls.json") else "SM"
            self._answer(provider.status, {"sid": prefix + uuid.uuid4().hex, "status": "queued"})
        else:
            self._answer(provider.status, {"id": "hook-" + uuid.uuid4().hex[:8]})

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpCollector]:
    handler = SmtpCollector()
    controller = Controller(handler, hostname="127.0.0.1", port=SMTP_PORT)
    controller.start()
    yield handler
    controller.stop()


@pytest.fixture(scope="session")
def phone_server() -> Iterator[PhoneProvider]:
    provider = PhoneProvider()
    httpd = ThreadingHTTPServer(("127.0.0.1", PHONE_PORT), _PhoneHandler)
    httpd.daemon_threads = True
    httpd.provider = provider  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield provider
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def smtp(smtp_server: SmtpCollector) -> Iterator[SmtpCollector]:
    smtp_server.reset()
    yield smtp_server
    smtp_server.reset()


@pytest.fixture
def phone(phone_server: PhoneProvider) -> Iterator[PhoneProvider]:
    phone_server.reset()
    yield phone_server
    phone_server.reset()


@pytest.fixture
def providers(settings: Any, smtp: SmtpCollector, phone: PhoneProvider) -> None:
    """Point this process at the loopback servers (the worker gets the same via its environment)."""
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", SMTP_PORT
    settings.EMAIL_USE_TLS = settings.EMAIL_USE_SSL = False
    settings.EMAIL_HOST_USER = settings.EMAIL_HOST_PASSWORD = ""
    settings.EMAIL_TIMEOUT = 10
    settings.DEFAULT_FROM_EMAIL = "hotfix@tgpadmin.test"
    settings.HOTFIX_PHONE_GATEWAY = "twilio"
    settings.HOTFIX_TWILIO_ACCOUNT_SID, settings.HOTFIX_TWILIO_AUTH_TOKEN = SID, TOKEN
    settings.HOTFIX_TWILIO_FROM = FROM_NUMBER
    settings.HOTFIX_TWILIO_BASE_URL = f"http://127.0.0.1:{PHONE_PORT}"
    settings.HOTFIX_HTTP_TIMEOUT = 5.0


@pytest.fixture
def run_tasks(django_capture_on_commit_callbacks: Any) -> Iterator[Callable[..., Any]]:
    """Run what a block queues, in this process: on-commit callbacks fire, tasks run eagerly (retries too)."""
    celery_app.conf.task_always_eager = True

    def run(function: Callable[..., Any], *args: Any) -> Any:
        with django_capture_on_commit_callbacks(execute=True):
            return function(*args)

    yield run
    celery_app.conf.task_always_eager = False


# --- data ---------------------------------------------------------------------------


def make_release(**fields: Any) -> Release:
    n = next(_serial)
    fields.setdefault("hotfix", True)
    release = Release.objects.create(version=f"7.{n}.1", **fields)
    for name in ("tgpro-base", "tgpro-browser"):
        Package.objects.create(
            release=release, name=name, version=f"7.{n}.1", file=f"{name}.tar.gz", size=1, sha256="0" * 64
        )
    return release


def make_node(cluster: Cluster | None = None, **fields: Any) -> Node:
    return Node.objects.create(hostname=f"hf{next(_serial)}-{uuid.uuid4().hex[:4]}", cluster=cluster, **fields)


def make_cluster() -> Cluster:
    return Cluster.objects.create(name=f"cl{next(_serial)}-{uuid.uuid4().hex[:4]}")


def make_contact(name: str, *, nodes: tuple[Node, ...] = (), clusters: tuple[Cluster, ...] = (), **fields: Any):
    fields.setdefault("email", f"{name.lower()}@customer.test")
    contact = Contact.objects.create(name=name, **fields)
    contact.nodes.set(nodes)
    contact.clusters.set(clusters)
    return contact


def make_notice(*, nodes: tuple[Node, ...] = (), clusters: tuple[Cluster, ...] = (), **fields: Any) -> HotfixNotice:
    fields.setdefault("release", make_release())
    fields.setdefault("title", "Login loop after certificate rollover")
    fields.setdefault("text", "Apply hotfix today: users cannot log on after the certificate rollover.")
    notice = HotfixNotice.objects.create(**fields)
    notice.nodes.set(nodes)
    notice.clusters.set(clusters)
    return notice


def states(notice: HotfixNotice) -> dict[tuple[str, str], str]:
    return {(d.contact.name, d.channel): d.state for d in notice.deliveries.select_related("contact")}


# --- who is affected ------------------------------------------------------------------


@pytest.mark.django_db
def test_affected_contacts_come_from_nodes_clusters_and_the_clusters_of_nodes():
    cluster, other_cluster = make_cluster(), make_cluster()
    node_in_cluster, single, elsewhere = make_node(cluster), make_node(), make_node(other_cluster)
    cluster_member = make_node(other_cluster)
    of_node = make_contact("OfNode", nodes=(single,))
    of_cluster_of_node = make_contact("OfClusterOfNode", clusters=(cluster,))
    of_affected_cluster = make_contact("OfCluster", clusters=(other_cluster,))
    of_node_in_affected_cluster = make_contact("OfMember", nodes=(cluster_member,))
    make_contact("Inactive", nodes=(single,), active=False)
    make_contact("Unrelated", nodes=(make_node(),))

    notice = make_notice(nodes=(node_in_cluster, single), clusters=(other_cluster,))

    assert set(services.affected_contacts(notice)) == {
        of_node, of_cluster_of_node, of_affected_cluster, of_node_in_affected_cluster,
    }  # fmt: skip
    assert elsewhere in services.affected_nodes(notice)


@pytest.mark.django_db
def test_urgent_notice_adds_sms_and_calls_only_for_contacts_with_a_phone():
    node = make_node()
    make_contact("Mail", nodes=(node,))
    make_contact("Sms", nodes=(node,), phone="+4930123456")
    make_contact("Caller", nodes=(node,), phone="+4930123457", wants_calls=True)
    make_contact("PhoneOnly", nodes=(node,), email="", phone="+4930123458", wants_calls=True)

    normal, urgent = make_notice(nodes=(node,)), make_notice(nodes=(node,), urgency="urgent")
    assert services.plan_deliveries(normal) == 3
    assert services.plan_deliveries(urgent) == 8
    assert services.plan_deliveries(urgent) == 0, "planning again creates nothing"

    assert set(states(normal)) == {("Mail", "email"), ("Sms", "email"), ("Caller", "email")}
    assert set(states(urgent)) == {
        ("Mail", "email"), ("Sms", "email"), ("Sms", "sms"), ("Caller", "email"), ("Caller", "sms"),
        ("Caller", "call"), ("PhoneOnly", "sms"), ("PhoneOnly", "call"),
    }  # fmt: skip


@pytest.mark.django_db
def test_notice_for_a_release_that_is_no_hotfix_is_refused_with_a_clear_error():
    notice = HotfixNotice(release=make_release(hotfix=False), title="t", text="x")
    with pytest.raises(ValidationError, match="is not a hotfix"):
        notice.full_clean()


@pytest.mark.django_db
def test_contact_phone_must_be_e164():
    with pytest.raises(ValidationError) as raised:
        Contact(name="X", email="x@customer.test", phone="030 123456").full_clean()
    assert "phone" in raised.value.message_dict


@pytest.mark.django_db
def test_nodes_running_hotfix_by_version_or_by_all_its_packages():
    release = make_release()
    wanted = dict(release.packages.values_list("name", "version"))
    by_version = make_node(installed_version=release.version)
    by_packages = make_node(installed_version="2.1.0", installed_packages={**wanted, "tgpro-vnc": "2.1.0"})
    partly = make_node(installed_version="2.1.0", installed_packages={"tgpro-base": wanted["tgpro-base"]})
    notice = make_notice(release=release, nodes=(by_version, by_packages, partly))

    assert set(services.nodes_running_hotfix(notice)) == {by_version, by_packages}


# --- delivery over real SMTP and HTTP ------------------------------------------------------


@pytest.mark.django_db
def test_email_arrives_over_smtp_with_subject_text_and_html(providers, smtp, run_tasks):
    node = make_node()
    make_contact("Alice", nodes=(node,))
    notice = make_notice(nodes=(node,))

    assert run_tasks(services.send_notification, notice) == 1

    assert len(smtp.messages) == 1
    mail = smtp.messages[0]
    assert mail.rcpt_tos == ["alice@customer.test"]
    assert mail.mail_from == "hotfix@tgpadmin.test"
    assert mail.message["Subject"] == f"[Hotfix] {notice.title} ({notice.release.version})"
    assert notice.text in mail.part("text/plain") and node.hostname in mail.part("text/plain")
    assert notice.text in mail.part("text/html") and "<html" in mail.part("text/html")
    delivery = notice.deliveries.get()
    assert (delivery.state, delivery.attempts, delivery.address) == ("sent", 1, "alice@customer.test")
    assert delivery.provider_ref == mail.message["Message-ID"]
    notice.refresh_from_db()
    assert notice.sent_at is not None


@pytest.mark.django_db
def test_urgent_notice_sends_email_sms_and_call_through_twilio(providers, smtp, phone, run_tasks):
    node = make_node()
    make_contact("Carol", nodes=(node,), phone="+4930111111", wants_calls=True)
    make_contact("Dave", nodes=(node,), phone="+4930222222")
    notice = make_notice(nodes=(node,), urgency="urgent", text="Install 7.x now & reboot <today>.")

    assert run_tasks(services.send_notification, notice) == 5

    assert sorted(m.rcpt_tos[0] for m in smtp.messages) == ["carol@customer.test", "dave@customer.test"]
    assert all(m.message["Subject"].startswith("[URGENT hotfix] ") for m in smtp.messages)
    sms, calls = phone.twilio("Messages"), phone.twilio("Calls")
    assert all(r["auth"] == _PhoneHandler.expected_auth for r in phone.requests)
    assert sorted(r["form"]["To"] for r in sms) == ["+4930111111", "+4930222222"]
    assert all(r["form"]["From"] == FROM_NUMBER and notice.text in r["form"]["Body"] for r in sms)
    assert [r["form"]["To"] for r in calls] == ["+4930111111"]
    twiml = calls[0]["form"]["Twiml"]
    assert twiml.startswith("<Response><Say>") and twiml.endswith("</Say></Response>")
    assert "Install 7.x now &amp; reboot &lt;today&gt;." in twiml
    refs = {d.channel: d.provider_ref for d in notice.deliveries.filter(contact__name="Carol")}
    assert refs["sms"].startswith("SM") and refs["call"].startswith("CA")
    assert set(states(notice).values()) == {"sent"}


@pytest.mark.django_db
def test_webhook_gateway_posts_json_with_bearer_token(providers, settings, phone, run_tasks):
    settings.HOTFIX_PHONE_GATEWAY = "webhook"
    settings.HOTFIX_WEBHOOK_URL = f"http://127.0.0.1:{PHONE_PORT}/notify"
    settings.HOTFIX_WEBHOOK_TOKEN = WEBHOOK_TOKEN
    node = make_node()
    make_contact("Erin", nodes=(node,), email="", phone="+4930333333", wants_calls=True)
    notice = make_notice(nodes=(node,), urgency="urgent")

    run_tasks(services.send_notification, notice)

    assert sorted((r["path"], r["json"]["channel"], r["json"]["to"]) for r in phone.requests) == [
        ("/notify", "call", "+4930333333"), ("/notify", "sms", "+4930333333"),
    ]  # fmt: skip
    assert all(r["auth"] == f"Bearer {WEBHOOK_TOKEN}" and notice.text in r["json"]["text"] for r in phone.requests)
    assert all(d.provider_ref.startswith("hook-") and d.state == "sent" for d in notice.deliveries.all())


@pytest.mark.django_db
def test_failing_gateway_is_retried_then_fails_with_scrubbed_error(providers, phone, run_tasks, caplog):
    phone.status = 503
    node = make_node()
    make_contact("Frank", nodes=(node,), email="", phone="+4930444444")
    notice = make_notice(nodes=(node,), urgency="urgent")

    with caplog.at_level("INFO"):
        run_tasks(services.send_notification, notice)

    delivery = notice.deliveries.get()
    max_retries = hotfix_tasks.deliver.max_retries
    assert delivery.state == "failed"
    assert delivery.attempts == max_retries + 1 == len(phone.requests)
    assert "HTTP 503" in delivery.last_error
    basic = _PhoneHandler.expected_auth.split()[1]
    for secret in (SID, TOKEN, basic):
        assert secret not in delivery.last_error
        assert secret not in caplog.text
    assert "HTTP Request" in caplog.text, "httpx logged the requests (with the SID scrubbed)"


@pytest.mark.django_db
def test_gateway_refusal_400_fails_at_once(providers, phone, run_tasks):
    phone.status = 400
    node = make_node()
    make_contact("Gina", nodes=(node,), email="", phone="+4930555555")
    notice = make_notice(nodes=(node,), urgency="urgent")

    run_tasks(services.send_notification, notice)

    delivery = notice.deliveries.get()
    assert (delivery.state, delivery.attempts, len(phone.requests)) == ("failed", 1, 1)
    assert "HTTP 400" in delivery.last_error and TOKEN not in delivery.last_error


@pytest.mark.django_db
def test_smtp_5xx_refusal_fails_at_once_and_4xx_is_retried(providers, smtp, run_tasks):
    node = make_node()
    make_contact("Hank", nodes=(node,))
    make_contact("Ivy", nodes=(node,))
    smtp.refuse = {"hank@customer.test": "550 5.1.1 no such user", "ivy@customer.test": "451 4.7.1 greylisted"}
    notice = make_notice(nodes=(node,))

    run_tasks(services.send_notification, notice)

    hank, ivy = (notice.deliveries.get(contact__name=name) for name in ("Hank", "Ivy"))
    assert (hank.state, hank.attempts) == ("failed", 1) and "550" in hank.last_error
    assert (ivy.state, ivy.attempts) == ("failed", hotfix_tasks.deliver.max_retries + 1) and "451" in ivy.last_error
    assert smtp.messages == []


@pytest.mark.django_db
def test_second_send_notification_notifies_nobody_twice(providers, smtp, phone, run_tasks):
    node = make_node()
    make_contact("Jack", nodes=(node,), phone="+4930666666", wants_calls=True)
    notice = make_notice(nodes=(node,), urgency="urgent")

    assert run_tasks(services.send_notification, notice) == 3
    assert run_tasks(services.send_notification, notice) == 0

    assert len(smtp.messages) == 1 and len(phone.requests) == 2
    assert notice.deliveries.count() == 3


@pytest.mark.django_db
def test_duplicate_task_message_is_claimed_once(providers, smtp):
    node = make_node()
    make_contact("Kim", nodes=(node,))
    notice = make_notice(nodes=(node,))
    services.plan_deliveries(notice)
    delivery = notice.deliveries.get()

    assert services.deliver(delivery.pk) == "sent"
    assert services.deliver(delivery.pk) == "skipped"

    assert len(smtp.messages) == 1
    delivery.refresh_from_db()
    assert delivery.attempts == 1


@pytest.mark.django_db
def test_resend_failed_only_resends_the_failed_deliveries(providers, smtp, run_tasks):
    node = make_node()
    make_contact("Lea", nodes=(node,))
    make_contact("Max", nodes=(node,))
    smtp.refuse = {"max@customer.test": "550 5.1.1 mailbox unavailable"}
    notice = make_notice(nodes=(node,))
    run_tasks(services.send_notification, notice)
    assert states(notice) == {("Lea", "email"): "sent", ("Max", "email"): "failed"}

    smtp.refuse.clear()  # the customer fixed the mailbox
    assert run_tasks(services.resend_failed, notice) == 1

    assert [m.rcpt_tos for m in smtp.messages] == [["lea@customer.test"], ["max@customer.test"]]
    assert states(notice) == {("Lea", "email"): "sent", ("Max", "email"): "sent"}
    assert run_tasks(services.resend_failed, notice) == 0


# --- admin ------------------------------------------------------------------------------


def staff_user(*codenames: str) -> User:
    user = User.objects.create_user(f"op{next(_serial)}", password="x", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="hotfixes", codename__in=codenames))
    return user


def post_action(client: Any, action: str, notice: HotfixNotice) -> Any:
    return client.post(
        reverse("admin:hotfixes_hotfixnotice_changelist"), {"action": action, "_selected_action": [notice.pk]}
    )


@pytest.mark.django_db
@pytest.mark.parametrize("action", ["send_notification", "resend_failed"])
def test_admin_action_without_permission_is_403(client, action):
    node = make_node()
    make_contact("Nina", nodes=(node,))
    notice = make_notice(nodes=(node,))
    client.force_login(staff_user("view_hotfixnotice"))

    assert post_action(client, action, notice).status_code == 403
    assert not notice.deliveries.exists()


@pytest.mark.django_db
def test_admin_send_notification_with_permission_queues_and_reports(client, providers, smtp, run_tasks):
    node = make_node()
    make_contact("Olga", nodes=(node,))
    make_contact("Paul", nodes=(node,))
    notice = make_notice(nodes=(node,))
    client.force_login(staff_user("view_hotfixnotice", "send_hotfixnotice"))

    response = run_tasks(post_action, client, "send_notification", notice)
    assert response.status_code == 302
    assert len(smtp.messages) == 2 and set(states(notice).values()) == {"sent"}

    response = run_tasks(post_action, client, "send_notification", notice)
    assert response.status_code == 302 and len(smtp.messages) == 2
    page = client.get(response["Location"])
    assert "Queued 0 deliveries for 1 notice(s) (2 already sent, nothing sent twice)." in page.content.decode()


@pytest.mark.django_db
def test_admin_hides_actions_from_users_without_permission(client):
    client.force_login(staff_user("view_hotfixnotice"))
    page = client.get(reverse("admin:hotfixes_hotfixnotice_changelist")).content.decode()
    assert "send_notification" not in page


@pytest.mark.django_db
def test_admin_notice_page_queries_do_not_grow_with_deliveries(admin_client):
    release = make_release()
    node = make_node(installed_version=release.version)
    notice = make_notice(release=release, nodes=(node,), urgency="urgent")
    url = reverse("admin:hotfixes_hotfixnotice_change", args=[notice.pk])

    def queries(contacts: int) -> int:
        for _ in range(contacts):
            make_contact(f"C{next(_serial)}", nodes=(node,), phone="+4930777777", wants_calls=True)
        services.plan_deliveries(notice)
        admin_client.get(url)  # warm the per-process caches (content types)
        with CaptureQueriesContext(connection) as ctx:
            page = admin_client.get(url)
        assert page.status_code == 200 and node.hostname in page.content.decode()
        return len(ctx.captured_queries)

    few, many = queries(1), queries(5)
    assert notice.deliveries.count() == 18
    assert many == few


@pytest.mark.django_db
def test_data_migration_gives_the_update_group_send_and_view_permissions():
    from importlib import import_module

    from django.apps import apps

    # Transactional tests flush the groups the migrations created: run the migration's function again.
    import_module("hotfixes.migrations.0002_update_group").grant(apps, None)
    codenames = set(Group.objects.get(name="update").permissions.values_list("codename", flat=True))
    assert {"send_hotfixnotice", "view_contact", "view_hotfixnotice", "view_delivery"} <= codenames


# --- through the real control worker ------------------------------------------------------


@pytest.mark.workflow
@pytest.mark.timeout(120)
@pytest.mark.django_db(transaction=True)
def test_control_worker_delivers_urgent_notice_by_email_and_sms(control_worker, smtp, phone):
    node = make_node()
    make_contact("Quinn", nodes=(node,), phone="+4930888888")
    notice = make_notice(nodes=(node,), urgency="urgent")

    assert services.send_notification(notice) == 2

    wait_for(lambda: set(states(notice).values()) == {"sent"}, 60, "both deliveries to be sent by the worker")
    assert [m.rcpt_tos for m in smtp.messages] == [["quinn@customer.test"]]
    assert [r["form"]["To"] for r in phone.twilio("Messages")] == ["+4930888888"]
    assert phone.requests[0]["auth"] == _PhoneHandler.expected_auth


@pytest.mark.workflow
@pytest.mark.timeout(120)
@pytest.mark.django_db(transaction=True)
def test_control_worker_retries_with_backoff_then_marks_failed(control_worker, phone):
    phone.status = 503
    node = make_node()
    make_contact("Rosa", nodes=(node,), email="", phone="+4930999999")
    notice = make_notice(nodes=(node,), urgency="urgent")

    services.send_notification(notice)

    delivery = wait_for(lambda: notice.deliveries.filter(state="failed").first(), 60, "the delivery to fail")
    assert delivery.attempts == WORKER_MAX_RETRIES + 1 == len(phone.requests)
    assert "HTTP 503" in delivery.last_error and SID not in delivery.last_error and TOKEN not in delivery.last_error
