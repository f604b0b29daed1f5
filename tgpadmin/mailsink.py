"""A local SMTP sink for the demo: every mail tgpadmin sends lands in
var/mail/ as an .eml file, and a line per mail is printed.
``python -m tgpadmin.mailsink [--port 1025]``."""

from __future__ import annotations

import argparse
import os
import signal
import time
from email import message_from_bytes
from email.policy import default
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


class Sink:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802  (aiosmtpd's name)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns()}.eml"
        (self.directory / name).write_bytes(envelope.content)
        subject = message_from_bytes(envelope.content, policy=default)["subject"]
        print(f"mail to {', '.join(envelope.rcpt_tos)}: {subject} -> var/mail/{name}", flush=True)
        return "250 OK"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("TGP_EMAIL_PORT", "1025")))
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    directory = Path(os.environ.get("TGP_VAR_DIR", root / "var")) / "mail"
    controller = Controller(Sink(directory), hostname="127.0.0.1", port=args.port)
    controller.start()
    print(f"SMTP sink on 127.0.0.1:{args.port}, mails in {directory}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    controller.stop()


if __name__ == "__main__":
    main()
