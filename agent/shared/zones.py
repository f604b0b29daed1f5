"""Time zone names: only canonical IANA zones, the same rule on both sides.

zoneinfo opens any file under its search path, so it also accepts names that are
no place's time: "posixrules", "Factory", "localtime" (the machine's own, whatever
it is), the "right/" zones (clocks that count leap seconds, off by half a minute
from everyone else's) and the "posix/" copies. Old names ("US/Eastern", "UTC")
are links to a canonical zone: they are refused with the name to use instead, so
one zone has one spelling in schedules and configuration ("UTC" excepted: it is
how most machines are configured).

The agent (TGP_TIME_ZONE) and the control side (schedules) both use canonical_zone.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from zoneinfo import TZPATH, ZoneInfo, ZoneInfoNotFoundError, available_timezones

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*\Z")
_NOT_PLACES = frozenset({"posixrules", "Factory", "localtime"})
_NOT_PLACE_DIRS = frozenset({"posix", "right"})
# Links that are everybody's spelling of their zone: refusing them would stop
# deployments configured the usual way for no clock's sake.
_USUAL_LINKS = frozenset({"UTC"})


@cache
def _links() -> dict[str, str]:
    """Old name -> canonical name, from the tz database's compiled source (tzdata.zi,
    "L TARGET NAME" lines) where the system has one. Without it, links pass."""
    for base in TZPATH:
        path = Path(base) / "tzdata.zi"
        if path.is_file():
            lines = (line.split() for line in path.read_text().splitlines() if line.startswith("L "))
            return {parts[2]: parts[1] for parts in lines if len(parts) == 3}
    return {}


@cache
def _known() -> frozenset[str]:
    return frozenset(available_timezones())


def canonical_zone(name: str) -> ZoneInfo:
    """The zone `name` names; ValueError saying why and what to use if it is not a
    canonical IANA zone name."""
    if not _NAME_RE.match(name or "") or name not in _known():
        raise ValueError(f"{name!r} is not a time zone (use a name such as Europe/Berlin)")
    if name in _NOT_PLACES or name.split("/", 1)[0] in _NOT_PLACE_DIRS:
        raise ValueError(f"{name!r} is not the time zone of a place (use a name such as Europe/Berlin)")
    target = _links().get(name)
    if target and name not in _USUAL_LINKS:
        raise ValueError(f"{name!r} is an old name of {target}: use {target}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a time zone (use a name such as Europe/Berlin)") from None
