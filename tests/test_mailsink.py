"""The demo's SMTP sink keeps every mail as an .eml file to look at."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from email.message import EmailMessage

from tests.conftest import ROOT, stop_process, wait_for
from tests.servers import free_port
from tgpadmin.processes import die_with_parent


def test_mails_sent_to_the_demo_sink_land_in_var_mail(tmp_path):
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "TGP_VAR_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tgpadmin.mailsink", "--port", str(port)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=die_with_parent,
    )  # fmt: skip
    try:
        assert "SMTP sink on" in proc.stdout.readline()
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "tgpadmin@localhost", "carol@example.com", "[Hotfix] test"
        msg.set_content("body")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.send_message(msg)
        (eml,) = wait_for(lambda: list((tmp_path / "mail").glob("*.eml")), 10, "the .eml file")
        assert b"Subject: [Hotfix] test" in eml.read_bytes()
    finally:
        stop_process(proc)
