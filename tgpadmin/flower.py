"""Start Flower, but never without credentials.

Flower reads FLOWER_BASIC_AUTH ("user:password[,user2:password2]") from the
environment, which keeps the secret out of the process list and the logs.
``python -m tgpadmin.flower [--port N]`` refuses to start when it is missing.
"""

from __future__ import annotations

import os
import re
import sys

AUTH_RE = re.compile(r"^[^:,\s]+:[^,\s]{8,}(,[^:,\s]+:[^,\s]{8,})*$")


def main(argv: list[str]) -> int:
    auth = os.environ.get("FLOWER_BASIC_AUTH", "")
    if not AUTH_RE.match(auth):
        print(
            "Flower needs credentials: set FLOWER_BASIC_AUTH=user:password "
            "(password at least 8 characters; several pairs separated by commas).",
            file=sys.stderr,
        )
        return 2
    address = os.environ.get("TGP_FLOWER_ADDRESS", "127.0.0.1")
    port = os.environ.get("TGP_FLOWER_PORT", "5555")
    args = [sys.executable, "-m", "celery", "-A", "tgpadmin", "flower", f"--address={address}", f"--port={port}"]
    os.execv(sys.executable, args + argv)  # noqa: S606  (Flower replaces this process: signals reach it directly)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
