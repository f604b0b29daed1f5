"""Other hosts on this machine, for benchmarks and tests. `host()`: a second host, a
network namespace joined to this one by a veth pair (10.231.0.1 here, 10.231.0.2
there). `lan()`: several hosts on one network, a namespace each behind a bridge that
this machine is on too. `Forwarder`: a TCP forwarder for a service that listens on
loopback only (the machine's PostgreSQL). Needs root and iproute2; `available()` says
whether they are here."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

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
        yield Host(name, THERE).prefix
    finally:
        with suppress(subprocess.CalledProcessError):
            ip("netns", "del", name)


# lan(): this machine is the network's first address, its hosts from .11 on.
LAN_NET = "10.232.0"
GATEWAY = f"{LAN_NET}.1"


@dataclass(frozen=True)
class Host:
    name: str  # its network namespace
    address: str

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a process on this host."""
        return ["ip", "netns", "exec", self.name]


@contextmanager
def lan(name: str, hosts: list[str]) -> Iterator[dict[str, Host]]:
    """Hosts on one network, as on a LAN: a bridge `name` here (GATEWAY) and a namespace
    `name-host` for each, with an address of its own; they reach each other and this
    machine. Everything is removed afterwards."""
    bridge = name[:15]
    made: dict[str, Host] = {}
    _remove_lan(bridge, [f"{name}-{h}" for h in hosts])  # left over from a run that was killed
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{GATEWAY}/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for i, short in enumerate(hosts):
            host = made[short] = Host(f"{name}-{short}", f"{LAN_NET}.{11 + i}")
            ip("netns", "add", host.name)
            here, there = f"{bridge[:11]}h{i}", f"{bridge[:11]}n{i}"
            ip("link", "add", here, "type", "veth", "peer", "name", there)
            ip("link", "set", there, "netns", host.name)
            ip("link", "set", here, "master", bridge)
            ip("link", "set", here, "up")
            for args in (("addr", "add", f"{host.address}/24", "dev", there), ("link", "set", there, "up"),
                         ("link", "set", "lo", "up")):  # fmt: skip
                ip("netns", "exec", host.name, "ip", *args)
        yield made
    finally:
        _remove_lan(bridge, [h.name for h in made.values()])


def _remove_lan(bridge: str, namespaces: list[str]) -> None:
    """Deleting a namespace deletes the veth pair it holds an end of."""
    for namespace in namespaces:
        with suppress(subprocess.CalledProcessError):
            ip("netns", "del", namespace)
    with suppress(subprocess.CalledProcessError):
        ip("link", "del", bridge)


class Forwarder:
    """address:port -> 127.0.0.1:target, in a thread of this process (asyncio); address
    is this machine's end of host() unless given."""

    def __init__(self, target: int, address: str = HERE) -> None:
        self.target, self.address = target, address
        self.port = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, self.address, 0))
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
