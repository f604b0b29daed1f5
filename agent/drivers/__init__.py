"""Drivers carry out node steps on an appliance. The agent picks one by
TGP_NODE_DRIVER: ``simulated`` (demo and tests) or ``shell`` (real hosts)."""

from __future__ import annotations

import importlib
from pathlib import Path

from agent.drivers.base import Driver


def get_driver(hostname: str, name: str, state_dir: Path) -> Driver:
    """The driver `name` for the appliance `hostname`, keeping its state in `state_dir`."""
    if name == "simulated":
        from agent.drivers.simulated import SimulatedDriver

        return SimulatedDriver(hostname, state_dir)
    if name == "shell":
        from agent.drivers.shell import ShellDriver

        return ShellDriver(hostname, state_dir)
    if "." in name:  # a driver class of one's own, e.g. for benchmarks: "package.module.Class"
        module, _, attr = name.rpartition(".")
        driver_class = getattr(importlib.import_module(module), attr)
        return driver_class(hostname, state_dir)  # type: ignore[no-any-return]
    raise ValueError(f"unknown node driver {name!r} (use 'simulated', 'shell' or a dotted class path)")
