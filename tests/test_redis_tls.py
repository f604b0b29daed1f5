"""TLS to Redis: a Redis 7 that speaks only TLS on a loopback port, with a server
certificate from a CA this module makes. The control side's settings and the agent
take ``rediss://`` plus TGP_REDIS_CA_FILE (agent/shared/env.py: env_redis_url); a
message goes from the control side to a real agent and its report comes back, every
process on its own broker user. A client without the CA is refused; so is TLS that
would check no certificate."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from kombu import Connection

from agent.shared.env import ConfigError, env_redis_url
from tests.conftest import CONTROL_KEY, ROOT, process_env
from tests.test_broker_acl import REDIS7, AclRedis, RedisServer, needs_redis7
from tgpadmin import broker_acl as acl
from tgpadmin.processes import die_with_parent, stop_process

pytestmark = [needs_redis7, pytest.mark.timeout(120)]


def _make_ca(directory: Path, name: str) -> tuple[Path, object, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def _make_server_cert(directory: Path, ca_cert: object, ca_key: object) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)  # type: ignore[attr-defined]
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass
class TlsRedis:
    server: RedisServer
    ca: Path
    other_ca: Path
    users: AclRedis

    @property
    def plain_base(self) -> str:
        return f"rediss://127.0.0.1:{self.server.port}/0"

    def url(self, user: str) -> str:
        """A user's URL as its process gets it: no TLS options, the CA from TGP_REDIS_CA_FILE."""
        return acl.user_url(self.plain_base, user, self.users.passwords[user])


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    assert REDIS7 is not None
    work = tmp_path_factory.mktemp("tls-redis")
    ca, ca_cert, ca_key = _make_ca(work, "tgp-test-ca")
    other_ca, _, _ = _make_ca(work, "someone-else")
    cert, key = _make_server_cert(work, ca_cert, ca_key)
    tls_args = ("--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca))
    server = RedisServer(REDIS7, work / "data", *tls_args, "--tls-auth-clients", "no").start(tls=True)
    query = f"?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(f"rediss://127.0.0.1:{server.port}/0{query}").ping()
            break
        except redis.exceptions.ConnectionError:
            if server.proc is not None and server.proc.poll() is not None:
                log = (work / "data" / "redis.log").read_text()
                pytest.skip(f"{REDIS7} did not start with TLS: {log[-300:]}")
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    # The users and their URL files (which carry the same TLS options).
    users = AclRedis(server, work / "broker", tls_query=query)
    users.apply({"t1": None})
    yield TlsRedis(server, ca, other_ca, users)
    server.stop()


def test_debian_redis_7_is_built_with_tls():
    assert REDIS7 is not None
    out = subprocess.run(["ldd", REDIS7], capture_output=True, text=True).stdout
    assert "libssl" in out, f"{REDIS7} is not linked with OpenSSL"


def test_the_server_speaks_tls_only(tls):
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(f"redis://127.0.0.1:{tls.server.port}/0", socket_timeout=2).ping()


def test_a_client_without_the_ca_is_refused(tls, monkeypatch):
    monkeypatch.delenv("TGP_REDIS_URL_FILE", raising=False)
    monkeypatch.setenv("REDIS_URL", tls.url("control"))
    # No CA: the system's CAs, which do not know ours.
    monkeypatch.delenv("TGP_REDIS_CA_FILE", raising=False)
    url = env_redis_url("redis://unused")
    assert "ssl_cert_reqs=required" in url
    with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(url).ping()
    with Connection(url) as conn, pytest.raises(Exception, match="certificate verify failed"):  # noqa: PT011
        conn.ensure_connection(max_retries=1)
    # Someone else's CA.
    monkeypatch.setenv("TGP_REDIS_CA_FILE", str(tls.other_ca))
    with pytest.raises(redis.exceptions.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(env_redis_url("redis://unused")).ping()
    # Ours.
    monkeypatch.setenv("TGP_REDIS_CA_FILE", str(tls.ca))
    assert redis.Redis.from_url(env_redis_url("redis://unused")).ping()


def test_tls_that_checks_no_certificate_is_refused_and_the_ca_needs_tls(tls, monkeypatch, tmp_path):
    monkeypatch.delenv("TGP_REDIS_URL_FILE", raising=False)
    monkeypatch.setenv("REDIS_URL", tls.url("control") + "?ssl_cert_reqs=none")
    monkeypatch.delenv("TGP_REDIS_CA_FILE", raising=False)
    with pytest.raises(ConfigError, match="ssl_cert_reqs=none") as refused:
        env_redis_url("redis://unused")
    assert tls.users.passwords["control"] not in str(refused.value)
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{tls.server.port}/0")
    monkeypatch.setenv("TGP_REDIS_CA_FILE", str(tls.ca))
    with pytest.raises(ConfigError, match="not a rediss"):
        env_redis_url("redis://unused")
    monkeypatch.setenv("REDIS_URL", tls.url("control"))
    monkeypatch.setenv("TGP_REDIS_CA_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="not a file"):
        env_redis_url("redis://unused")


# The control side, as a process of its own with tgpadmin's settings: queue a notice for
# the agent, use the update slots and the result backend, read Flower's queue length,
# then wait for the agent's report in the control queue.
CONTROL_SIDE = textwrap.dedent(
    """
    import asyncio, json, sys, time
    import django
    django.setup()
    from django.conf import settings
    from flower.utils.broker import Broker
    from tgpadmin.celery import app
    from updates.slots import slots_for_url
    from agent.shared.protocol import NoticeCommand
    from updates import trust

    out = {"broker_url": settings.CELERY_BROKER_URL, "use_ssl": settings.CELERY_BROKER_USE_SSL}
    notice = trust.command("notice", NoticeCommand(node="t1", notice_id="tls-1", message="over TLS").to_wire())
    app.send_task("node.announce", args=(notice,), queue="node.t1")
    slots = slots_for_url(settings.REDIS_URL)
    out["slot"] = slots.acquire("tls", "t1", 1)
    slots.force_release("tls", "t1")
    out["backend_ping"] = app.backend.client.ping()
    broker = Broker(settings.CELERY_BROKER_URL, broker_use_ssl=settings.CELERY_BROKER_USE_SSL)
    out["flower_queues"] = asyncio.run(broker.queues(["control"]))
    reports = []
    deadline = time.monotonic() + 60
    with app.connection_for_read() as conn, conn.SimpleQueue("control") as queue:
        # The worker's ready report, then the notice's.
        while sum(r["body"]["message"].get("snapshot", {}).get("worker", False) for r in reports) < 2:
            if time.monotonic() > deadline:
                break
            try:
                message = queue.get(timeout=1)
            except queue.Empty:
                continue
            reports.append(message.payload[0][0])
            message.ack()
    out["reports"] = reports
    print(json.dumps(out))
    """
)


def test_a_message_round_trip_over_tls(tls, tmp_path):
    tls.users.reset_log()
    state = tmp_path / "nodes"
    base_env = {**os.environ, "TGP_REDIS_CA_FILE": str(tls.ca), "PYTHONUNBUFFERED": "1", "REDIS_URL": ""}
    agent_env = {
        **base_env,
        "TGP_REDIS_URL_FILE": str(tls.users.dir / "node-t1.url"),
        "TGP_NODE_STATE_DIR": str(state),
        "TGP_HEARTBEAT_INTERVAL": "0.5",
        "DJANGO_SETTINGS_MODULE": "no.such.settings",
        "TGP_CONTROL_PUBKEY": CONTROL_KEY.public,
    }
    seed = [sys.executable, "-m", "agent", "simulate", "t1", "--version", "2.1.0", "--users", "alice"]
    subprocess.run([*seed, "--packages", '{"tgpro-base": "2.1.0"}'], env=agent_env, check=True, capture_output=True)
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "t1"], cwd=ROOT, env=agent_env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        control_env = {**process_env(""), **base_env, "TGP_REDIS_URL_FILE": str(tls.users.dir / "control.url")}
        done = subprocess.run(
            [sys.executable, "-c", CONTROL_SIDE], cwd=ROOT, env=control_env, capture_output=True, text=True,
            timeout=90,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        stop_process(agent)
    assert result["broker_url"].startswith("rediss://control:")
    assert f"ssl_ca_certs={tls.ca}" in result["broker_url"] and "ssl_cert_reqs=required" in result["broker_url"]
    assert result["use_ssl"] == {"ssl_cert_reqs": "required", "ssl_ca_certs": str(tls.ca)}
    assert result["slot"] == 1 and result["backend_ping"] is True
    assert result["flower_queues"][0]["name"] == "control"
    said = [r["body"]["message"] for r in result["reports"]]
    assert sum(m.get("snapshot", {}).get("worker", False) for m in said) == 2, said
    assert {r["body"]["signer"] for r in result["reports"]} == {"t1"}
    assert "over TLS" in (state / "t1" / "state.json").read_text(), "the notice reached the appliance"
    assert "node.announce" in log.read_text()
    assert tls.users.denials() == []
