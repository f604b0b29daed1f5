"""A second host on this machine, for benchmarks: a network namespace joined to this
one by a veth pair (10.231.0.1 here, 10.231.0.2 there), and a TCP forwarder for a
service that listens on loopback only (the machine's PostgreSQL). Needs root and
iproute2; `available()` says whether they are here."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

HERE, THERE = "10.231.0.1", "10.231.0.2"


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def host(name: str) -> Iterator[list[str]]:
    """A namespace `name` reachable at THERE from HERE; yields the command prefix that runs
    a process in it. Removed (with its veth pair) afterwards."""
    with suppress(subprocess.CalledProcessError):
        ip("netns", "del", name)  # left over from a run that was killed
    ip("netns", "add", name)
    try:
        ip("link", "add", f"vh-{name}", "type", "veth", "peer", "name", f"vn-{name}")
        ip("link", "set", f"vn-{name}", "netns", name)
        ip("addr", "add", f"{HERE}/30", "dev", f"vh-{name}")
        ip("link", "set", f"vh-{name}", "up")
        for args in (("addr", "add", f"{THERE}/30", "dev", f"vn-{name}"), ("link", "set", f"vn-{name}", "up"),
                     ("link", "set", "lo", "up")):  # fmt: skip
            ip("netns", "exec", name, "ip", *args)
        yield ["ip", "netns", "exec", name]
    finally:
        with suppress(subprocess.CalledProcessError):
            ip("netns", "del", name)


class Forwarder:
    """HERE:port -> 127.0.0.1:target, in a thread of this process (asyncio)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, HERE, 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
