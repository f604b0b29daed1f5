"""Start Flower for looking only, and never without credentials.

Flower reads FLOWER_BASIC_AUTH ("user:password[,user2:password2]") from the
environment, which keeps the secret out of the process list and the logs.
``python -m tgpadmin.flower [--port N]`` refuses to start when it is missing.

With credentials, Flower 2.2 would also let anyone send and revoke tasks and
shut workers down, and it serves /metrics to anyone. So this module runs Flower's
own ``celery flower`` command in this process (signals reach Flower directly, as
with the exec before) after putting a gate in front of every handler class of
Flower's URL table, including the static-file routes Tornado adds itself:

- credentials on every route but /healthcheck and Flower's static files (which
  covers /metrics, which Flower 2.2 leaves open);
- reads only: GET, HEAD and OPTIONS pass; any other method gets 403 with
  READ_ONLY_MESSAGE, whatever the route, so a write endpoint that a later Flower
  adds is refused without anyone listing it. The one POST that reads, the tasks
  page's table (/tasks/datatable), is answered by the table's GET.

Flower's own ``read_only`` switch is set as well: its pages then offer no action
buttons, and its write handlers refuse too should a request ever get past the gate.

The gate relies on Flower 2.2.0's internals (requirements.txt pins it); when they
are not as expected, Flower does not start (FlowerChanged) rather than start writable.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

from tornado.web import HTTPError, RequestHandler, StaticFileHandler, URLSpec

AUTH_RE = re.compile(r"^[^:,\s]+:[^,\s]{8,}(,[^:,\s]+:[^,\s]{8,})*$")
FLOWER_VERSION = "2.2.0"
READ_ONLY_MESSAGE = "Flower is read-only in tgpadmin"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

logger = logging.getLogger("tgpadmin.flower")  # not "__main__" under python -m


class FlowerChanged(RuntimeError):
    """Flower is not the Flower this gate was written for: refuse to start it."""


class _Gate(RequestHandler):
    """Put in front of each Flower handler class (see gated()): credentials first, then reads only."""

    # Set on the gated classes: a route open to anyone, a class whose POST only reads.
    open_without_credentials = False
    post_reads = False

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # Flower's LoginHandler.__new__ hands out an instance of another class, which would
        # not pass this gate: every request is served by an instance of its gated class.
        return object.__new__(cls)

    async def prepare(self) -> None:
        result = super().prepare()
        if result is not None:
            await result
        # Flower's get_current_user raises 401 on missing or wrong basic-auth credentials.
        if not self.open_without_credentials and not self.current_user:
            raise HTTPError(401)
        method = self.request.method or ""
        if method in READ_METHODS or (method == "POST" and self.post_reads):
            return
        logger.warning("Refused %s %s: %s", method, self.request.path, READ_ONLY_MESSAGE)
        self.set_status(403)
        self.set_header("Content-Type", "text/plain; charset=UTF-8")
        self.finish(READ_ONLY_MESSAGE)  # a finished request is not dispatched to the handler's method


def _post_answered_by_get(self: Any, *args: Any, **kwargs: Any) -> Any:
    return self.get(*args, **kwargs)


def gated(cls: type[RequestHandler], *, open_without_credentials: bool = False, post_reads: bool = False) -> type:
    """A subclass of `cls` that only serves reads, to clients with credentials unless told otherwise."""
    if issubclass(cls, _Gate):
        return cls
    attrs: dict[str, Any] = {
        "__module__": __name__,
        "open_without_credentials": open_without_credentials,
        "post_reads": post_reads,
    }
    if post_reads:
        attrs["post"] = _post_answered_by_get  # not Flower's post, whatever it may do one day
    return type(f"ReadOnly{cls.__name__}", (_Gate, cls), attrs)


def install() -> None:
    """Gate Flower's URL table and make `celery flower` build the read-only app.
    FlowerChanged, before anything is changed, when Flower is not 2.2.0 as expected."""
    try:
        import flower
        from flower import app as flower_app
        from flower import command, urls
        from flower.views import BaseHandler, monitor
        from flower.views.tasks import TasksDataTable
    except ImportError as exc:
        raise FlowerChanged(f"Flower's modules moved: {exc}") from exc
    if getattr(flower, "__version__", None) != FLOWER_VERSION:
        raise FlowerChanged(f"Flower {getattr(flower, '__version__', '?')} installed, the gate is for {FLOWER_VERSION}")
    if flower_app.default_handlers is not urls.handlers:
        raise FlowerChanged("flower.app no longer builds its routes from flower.urls.handlers")
    if command.Flower is not flower_app.Flower and not issubclass(command.Flower, flower_app.Flower):
        raise FlowerChanged("the flower command no longer builds flower.app.Flower")
    if not callable(getattr(BaseHandler, "get_current_user", None)):
        raise FlowerChanged("Flower's handlers no longer check credentials in get_current_user")
    if not callable(getattr(TasksDataTable, "get", None)):
        raise FlowerChanged("the tasks table no longer has a GET")

    def gate(cls: type[RequestHandler]) -> type:
        return gated(
            cls,
            # /healthcheck writes "OK" and nothing else (flower/views/monitor.py), which tells
            # a prober no more than that the port answers; load balancers and honcho-style
            # supervisors can keep probing it without credentials. Static files are Flower's
            # own public CSS and JavaScript.
            open_without_credentials=issubclass(cls, monitor.Healthcheck | StaticFileHandler),
            post_reads=issubclass(cls, TasksDataTable),
        )

    table: list[URLSpec | tuple[Any, ...]] = []
    for entry in urls.handlers:
        if isinstance(entry, URLSpec):
            table.append(URLSpec(entry.regex.pattern, gate(entry.handler_class), entry.kwargs, entry.name))
        elif isinstance(entry, tuple) and len(entry) in (2, 3) and issubclass(entry[1], RequestHandler):
            table.append((entry[0], gate(entry[1]), *entry[2:]))
        else:
            raise FlowerChanged(f"unexpected entry in Flower's URL table: {entry!r}")
    classes = [entry[1] if isinstance(entry, tuple) else entry.handler_class for entry in table]
    for needed in (monitor.Metrics, monitor.Healthcheck, TasksDataTable):
        if not any(issubclass(cls, needed) for cls in classes):
            raise FlowerChanged(f"{needed.__name__} is no longer in Flower's URL table")

    class ReadOnlyFlower(flower_app.Flower):
        def __init__(self, options: Any = None, **kwargs: Any) -> None:
            # The options as Flower parsed them from FLOWER_* variables and the command line.
            if options is None or not AUTH_RE.match(",".join(options.basic_auth or [])):
                raise FlowerChanged("Flower's basic_auth option is not set as tgpadmin.flower checked it")
            options.read_only = True
            # Tornado adds its own routes for static_path (/static/, /favicon.ico, /robots.txt).
            kwargs["static_handler_class"] = gate(kwargs.get("static_handler_class", StaticFileHandler))
            super().__init__(options=options, **kwargs)
            rules = self.wildcard_router.rules
            ungated = [r for r in rules if not (isinstance(r.target, type) and issubclass(r.target, _Gate))]
            if ungated:
                raise FlowerChanged(f"routes without the read-only gate: {ungated}")

    urls.handlers[:] = table  # the very list flower.app passes to Tornado
    command.Flower = ReadOnlyFlower


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
    # Flower takes events and replies without acknowledgements: it needs no ack emulation,
    # and its broker user (manage.py broker_acl) no access to the transport's unacked keys.
    os.environ.setdefault("TGP_BROKER_ACK_EMULATION", "0")
    try:
        install()
        from celery.bin.celery import celery

        # `celery -A tgpadmin flower ...` in this process; exits through SystemExit when Flower stops.
        args = ["-A", "tgpadmin", "flower", f"--address={address}", f"--port={port}", *argv]
        celery.main(args=args, prog_name="celery", auto_envvar_prefix="CELERY")
    except FlowerChanged as exc:
        print(f"Flower not started, it could not be made read-only: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
