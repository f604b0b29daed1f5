"""Drivers carry out node steps on an appliance. The agent picks one by
TGP_NODE_DRIVER: ``simulated`` (demo and tests) or ``shell`` (real hosts)."""

from __future__ import annotations

from django.conf import settings
from django.utils.module_loading import import_string

from nodes.drivers.base import Driver


def get_driver(hostname: str, name: str | None = None) -> Driver:
    name = name or settings.TGP_NODE_DRIVER
    if name == "simulated":
        from nodes.drivers.simulated import SimulatedDriver

        return SimulatedDriver(hostname, settings.TGP_NODE_STATE_DIR / hostname)
    if name == "shell":
        from nodes.drivers.shell import ShellDriver

        return ShellDriver(hostname, settings.TGP_NODE_STATE_DIR / hostname)
    if "." in name:  # a driver class of one's own, e.g. for benchmarks: "package.module.Class"
        driver_class = import_string(name)
        return driver_class(hostname, settings.TGP_NODE_STATE_DIR / hostname)  # type: ignore[no-any-return]
    raise ValueError(f"unknown node driver {name!r} (use 'simulated', 'shell' or a dotted class path)")
