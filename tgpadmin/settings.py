"""tgpadmin settings: everything configurable comes from the environment.

See README.md ("Configuration") for the list of variables. Problems that can be
detected without crashing are reported as system checks (tgpadmin/checks.py).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import dj_database_url

from agent.shared.protocol import CONTROL_QUEUE, PUBLISH_RETRY_POLICY
from agent.shared.sentinel import is_sentinel_url
from tgpadmin.env import (
    env_bool,
    env_float,
    env_int,
    env_list,
    env_redis_sentinel,
    env_redis_url,
    env_secret,
    env_str,
    env_zone,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("TGP_VAR_DIR", str(BASE_DIR / "var")))


def _secret_key() -> str:
    """DJANGO_SECRET_KEY wins; otherwise a key generated once and kept in var/."""
    key = env_str("DJANGO_SECRET_KEY", "")
    if key:
        return key
    path = VAR_DIR / "secret_key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "tgpadmin.apps.AdminConfig",  # django.contrib.admin, with the fleet overview as its home page
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "tgpadmin",
    "nodes",
    "updates",
    "hotfixes",
    "auditlog",  # django-auditlog: the audit trail's rows (LogEntry)
    "audit",  # which operator actions it records, and its admin
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "audit.middleware.AuditMiddleware",  # the operator and their address, for the audit trail
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "tgpadmin.urls"
WSGI_APPLICATION = "tgpadmin.wsgi.application"
LOGIN_URL = "admin:login"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "tgpadmin" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "tgpadmin.context_processors.download_errors",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------
# SQLite by default (file under var/), PostgreSQL via DATABASE_URL. The test
# database is a file too, because worker processes in the workflow tests must
# see what the test process committed.
DATABASE_URL = env_str("DATABASE_URL", "")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60, conn_health_checks=True)}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(VAR_DIR / "db.sqlite3"),
            # Per process: two test sessions at once must not share one file.
            "TEST": {"NAME": str(VAR_DIR / f"test-db-{os.getpid()}.sqlite3")},
        }
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (web, control worker, tests) write: wait for the lock, take
    # it at BEGIN so that a read-then-write never deadlocks, and let readers work during writes.
    DATABASES["default"]["CONN_MAX_AGE"] = 600  # opening a connection (and its PRAGMAs) per task is measurable
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_zone("TGP_TIME_ZONE", "Europe/Berlin")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
X_FRAME_OPTIONS = "DENY"

# --- Redis and Celery ----------------------------------------------------------
# Without REDIS_URL, tgpadmin talks to its embedded Redis (tgpadmin/embedded_redis.py),
# which `make run` starts on a private port. With broker users (manage.py broker_acl,
# docs/security-broker.md) each process reads its own user's URL from the file that
# TGP_REDIS_URL_FILE names; a rediss:// URL checks the server against TGP_REDIS_CA_FILE.
# Beyond one host (README, "Deployment"): a sentinel:// URL names the Sentinels of a
# primary and its replicas, and every process asks them where the primary is now.
EMBEDDED_REDIS_PORT = env_int("TGP_EMBEDDED_REDIS_PORT", 6390, minimum=1)
REDIS_URL = env_redis_url(f"redis://127.0.0.1:{EMBEDDED_REDIS_PORT}/0")
# The Sentinels' name for the primary (TGP_REDIS_SENTINEL_MASTER) and their own credentials
# (agent/shared/sentinel.py); None without a name. A sentinel:// URL without one stops the
# process here; a name next to a plain URL is ignored and warned about (tgpadmin.W010).
REDIS_SENTINEL = env_redis_sentinel(REDIS_URL)
# Where manage.py broker_acl keeps each broker user's URL (with its password, mode 0600).
TGP_BROKER_DIR = Path(env_str("TGP_BROKER_DIR", str(VAR_DIR / "broker")))

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
if urlsplit(REDIS_URL).scheme == "rediss":
    # kombu, the result backend and redis-py read these from the URL as well; Flower's
    # broker page (queue lengths) only from here.
    CELERY_BROKER_USE_SSL = CELERY_REDIS_BACKEND_USE_SSL = {
        key: value for key, value in parse_qsl(urlsplit(REDIS_URL).query) if key.startswith("ssl_")
    }
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = CONTROL_QUEUE
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_EXPIRES = 24 * 3600
# The database rows are the truth about a run; task results are kept only where a
# task asks for it (Flower shows outcomes from events, not from the backend).
CELERY_TASK_IGNORE_RESULT = True
# "task-sent" events let Flower show a task before a worker takes it. (Node agents
# run their own Celery app, agent/app.py, which leaves them out.)
CELERY_TASK_SEND_SENT_EVENT = True
CELERY_WORKER_SEND_TASK_EVENTS = True
# Messages a control process takes ahead: with one, its worker fetched the next only
# after the last was acknowledged, and a fleet's heartbeats waited on those round trips
# (bench/fleet.py: 2,000 queued heartbeats drained at ~260/s with 1, ~400/s with 4).
# Control tasks are short or wait as ETA messages, which do not count against it.
CELERY_WORKER_PREFETCH_MULTIPLIER = env_int("TGP_CONTROL_PREFETCH", 4, minimum=1)
# Celery's Django fix-up would close the database connection around every task; with
# this it never does, and tgpadmin/celery.py closes only old or broken ones, as Django
# does around a request (CONN_MAX_AGE above).
CELERY_DB_REUSE_MAX = 2**62
CELERY_TASK_TRACK_STARTED = True
CELERY_TIMEZONE = TIME_ZONE
# django-celery-beat's, writing back only what it read (updates/beat.py).
CELERY_BEAT_SCHEDULER = "updates.beat:Scheduler"
# Static entries; django-celery-beat copies them into its tables at start.
CELERY_BEAT_SCHEDULE = {
    "reap-stale-runs": {"task": "control.reap_stale_runs", "schedule": 60.0, "options": {"queue": CONTROL_QUEUE}},
    # A schedule's entry whose firing was lost is armed again (updates.schedules.rearm_overdue).
    "rearm-schedules": {"task": "control.rearm_schedules", "schedule": 60.0, "options": {"queue": CONTROL_QUEUE}},
    "reconcile-runs": {
        "task": "control.reconcile",
        "schedule": env_float("TGP_RECONCILE_INTERVAL", 30.0, minimum=1.0),
        "options": {"queue": CONTROL_QUEUE},
    },
    # The repository's timestamp (one day) and snapshot (a week) signed again in time.
    "resign-repository": {
        "task": "control.resign_repository",
        "schedule": env_float("TGP_REPO_RESIGN_INTERVAL", 3600.0, minimum=1.0),
        "options": {"queue": CONTROL_QUEUE},
    },
    # Announced updates ("announce now, update at"): start those whose time has come.
    "start-announced-updates": {
        "task": "control.start_announced_updates",
        "schedule": env_float("TGP_ANNOUNCED_UPDATE_INTERVAL", 10.0, minimum=0.5),
        "options": {"queue": CONTROL_QUEUE},
    },
}
# Publishing (a chain's first task, a hand-off) survives a broker restart of up to
# about a minute instead of failing; the agents publish with the same policy.
CELERY_TASK_PUBLISH_RETRY_POLICY = PUBLISH_RETRY_POLICY
# An unacknowledged message comes back after this long. Node steps are acked on
# receipt (see agent/tasks.py), so this only matters for control tasks.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env_int("TGP_VISIBILITY_TIMEOUT", 3600, minimum=60),
    # Ack emulation keeps each message a consumer takes in the transport's shared
    # "unacked" hash until it is acknowledged, and every consumer restores the overdue
    # ones of all queues. The control workers need it; Flower, which only consumes
    # events and replies without acknowledgements, runs with TGP_BROKER_ACK_EMULATION=0,
    # so that its broker user needs no access to those keys (docs/security-broker.md).
    "ack_emulation": env_bool("TGP_BROKER_ACK_EMULATION", True),
}
if REDIS_SENTINEL is not None and is_sentinel_url(REDIS_URL):
    # kombu's SentinelChannel, Celery's SentinelBackend and Flower's broker page take the
    # primary's name and the Sentinels' credentials from their transport options; the
    # broker user of the URL logs on to whichever server the Sentinels name.
    CELERY_BROKER_TRANSPORT_OPTIONS.update(REDIS_SENTINEL.transport_options())
    CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = REDIS_SENTINEL.transport_options()

# --- Update workflow -------------------------------------------------------------
# The update repository (The Update Framework): where it is served, the TUF root the
# control plane pins (the agents pin the same, agent/config.py), where it keeps the
# metadata it verified, and, on the host that builds and signs the repository, its
# directory and the keys directory (README, "Repository keys"). The beat re-signs the
# snapshot and timestamp every TGP_REPO_RESIGN_INTERVAL seconds if the online keys are here.
TGP_REPO_URL = env_str("TGP_REPO_URL", "http://127.0.0.1:8001/")
TGP_REPO_ROOT_FILE = Path(env_str("TGP_REPO_ROOT_FILE", str(VAR_DIR / "keys" / "repo-root.json")))
TGP_REPO_METADATA_DIR = Path(env_str("TGP_REPO_METADATA_DIR", str(VAR_DIR / "tuf")))
TGP_REPO_KEYS_DIR = Path(env_str("TGP_REPO_KEYS_DIR", str(VAR_DIR / "keys" / "repo")))
# The control plane signs every command to a node with this key (made on first use);
# agents pin its public key (TGP_CONTROL_PUBKEY, or the file next to it, control.pub).
TGP_CONTROL_SIGNING_KEY_FILE = Path(env_str("TGP_CONTROL_SIGNING_KEY_FILE", str(VAR_DIR / "keys" / "control.key")))
# How long a node accepts a command (by its own clock): a scheduled run's download
# segment, or a slot wait before a hand-off, must fit in it.
TGP_COMMAND_TTL = env_float("TGP_COMMAND_TTL", 24 * 3600.0, minimum=60.0)
TGP_REPO_DIR = Path(env_str("TGP_REPO_DIR", str(VAR_DIR / "repo")))
# Where the demo's simulated appliances keep their state (the agents read the same variable).
TGP_NODE_STATE_DIR = Path(env_str("TGP_NODE_STATE_DIR", str(VAR_DIR / "nodes")))
# How long a node may be silent (no progress, no heartbeat) during a run before it fails.
# A cluster node holding out of the load balancer looks at its plan at least this often:
# a node before it that overruns moves its time, and its users hear of it, within this.
TGP_PLAN_LOOK = env_float("TGP_PLAN_LOOK", 30.0, minimum=0.1)
# A cluster node holding until its planned time takes a free update slot up to this long
# before it, and its drain goes to the node, which logs its users off at that time by its
# own clock: a control queue that is busy at that instant (a fleet-wide update) delays
# nobody. 0: the slot at the planned time. At most LONGEST_LOGOFF_WAIT (tgpadmin.E002).
TGP_DRAIN_AHEAD = env_float("TGP_DRAIN_AHEAD", 60.0, minimum=0.0)
# A delayed node's users are told the new time when it falls in another step of this
# many seconds than the time they were told (a minute: what their notice shows).
TGP_PLAN_NOTICE_STEP = env_float("TGP_PLAN_NOTICE_STEP", 60.0, minimum=0.001)
TGP_RUN_STALL_TIMEOUT = env_float("TGP_RUN_STALL_TIMEOUT", 1800.0, minimum=1.0)
# How long the control plane waits for a node to come back after the reboot step.
TGP_REBOOT_TIMEOUT = env_float("TGP_REBOOT_TIMEOUT", 600.0, minimum=1.0)
# A run quiet for this long, whose next step is the control plane's, is carried on
# by the reconciler (beat, every TGP_RECONCILE_INTERVAL seconds, and at worker start).
TGP_RECONCILE_AFTER = env_float("TGP_RECONCILE_AFTER", 60.0, minimum=0.1)
# A node's last_seen is kept to this resolution: a heartbeat that changes nothing else
# is not written while last_seen is younger (updates.runs.snapshots). The reconciler
# asks whether a node was seen within TGP_RECONCILE_AFTER, so this must stay below it
# (tgpadmin.E001). 30 s: every other heartbeat of an agent at the default 15 s.
TGP_SEEN_RESOLUTION = env_float("TGP_SEEN_RESOLUTION", min(30.0, TGP_RECONCILE_AFTER / 2), minimum=0.0)
# The manual's policy: 10 attempts per round. The agents make them (agent/config.py);
# the control plane names the number when it sets the warning flag.
TGP_DOWNLOAD_ATTEMPTS = env_int("TGP_DOWNLOAD_ATTEMPTS", 10, minimum=1)
# Default advance notice for "Announce maintenance" (the manual says about 2 hours).
TGP_MAINTENANCE_NOTICE_LEAD = env_float("TGP_MAINTENANCE_NOTICE_LEAD", 2 * 3600.0, minimum=0)
# An announced update that could not start within this many seconds of its time (beat or
# the control worker down) is refused, not started late: users who logged on since were not told.
TGP_ANNOUNCED_UPDATE_GRACE = env_float("TGP_ANNOUNCED_UPDATE_GRACE", 900.0, minimum=1.0)

# --- Audit trail (audit/, django-auditlog) ---------------------------------------------
# How many reverse proxies in front of the web process append to X-Forwarded-For: the
# address recorded is the one the outermost of them saw. 0: the connection's address
# (a header the client sends itself is never trusted).
TGP_PROXY_COUNT = env_int("TGP_PROXY_COUNT", 0, minimum=0)
# One correlation id per request or command (ties a bulk action's rows), never the client's header.
AUDITLOG_CID_GETTER = "audit.context.correlation_id"

# --- E-mail (hotfix notices) -------------------------------------------------------
EMAIL_HOST = env_str("TGP_EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("TGP_EMAIL_PORT", 25, minimum=1)
EMAIL_USE_TLS = env_bool("TGP_EMAIL_USE_TLS", False)  # STARTTLS, usually port 587
EMAIL_USE_SSL = env_bool("TGP_EMAIL_USE_SSL", False)  # implicit TLS, usually port 465
EMAIL_HOST_USER = env_str("TGP_EMAIL_USER", "")
EMAIL_HOST_PASSWORD = env_str("TGP_EMAIL_PASSWORD", "")
# Django waits forever by default: a silent SMTP server would hang the worker.
EMAIL_TIMEOUT = env_float("TGP_EMAIL_TIMEOUT", 30.0, minimum=1.0)
DEFAULT_FROM_EMAIL = env_str("TGP_EMAIL_FROM", "tgpadmin@localhost")

# --- Phone gateway for urgent hotfix notices: twilio, webhook or none --------------
HOTFIX_PHONE_GATEWAY = env_str("TGP_HOTFIX_PHONE_GATEWAY", "none")
HOTFIX_TWILIO_ACCOUNT_SID = env_str("TGP_TWILIO_ACCOUNT_SID", "")
HOTFIX_TWILIO_AUTH_TOKEN = env_str("TGP_TWILIO_AUTH_TOKEN", "")
HOTFIX_TWILIO_FROM = env_str("TGP_TWILIO_FROM", "")
HOTFIX_TWILIO_BASE_URL = env_str("TGP_TWILIO_BASE_URL", "https://api.twilio.com")
HOTFIX_WEBHOOK_URL = env_str("TGP_HOTFIX_WEBHOOK_URL", "")
HOTFIX_WEBHOOK_TOKEN = env_str("TGP_HOTFIX_WEBHOOK_TOKEN", "")
HOTFIX_HTTP_TIMEOUT = env_float("TGP_HOTFIX_HTTP_TIMEOUT", 10.0, minimum=0.1)
HOTFIX_RETRY_BACKOFF = env_int("TGP_HOTFIX_RETRY_BACKOFF", 2, minimum=1)
HOTFIX_DELIVERY_MAX_RETRIES = env_int("TGP_HOTFIX_DELIVERY_MAX_RETRIES", 5, minimum=0)

# --- Flower ------------------------------------------------------------------------
# "user:password" pairs, comma separated; read by Flower from FLOWER_BASIC_AUTH.
FLOWER_URL = env_str("TGP_FLOWER_URL", "http://127.0.0.1:5555/")

# --- Monitoring: /metrics (updates/metrics.py) ----------------------------------------
# Prometheus sends this as "Authorization: Bearer <token>"; TGP_METRICS_TOKEN_FILE names
# a file holding it instead. Empty: only users with nodes.scrape_metrics get in (basic
# auth or their session), and `manage.py check` warns (tgpadmin.W004). Django's error
# pages hide settings named *TOKEN*.
TGP_METRICS_TOKEN = env_secret("TGP_METRICS_TOKEN", min_length=16)
# The agents' heartbeat interval (agent/config.py reads the same variable): /metrics
# counts a node as silent after three of them.
TGP_HEARTBEAT_INTERVAL = env_float("TGP_HEARTBEAT_INTERVAL", 15.0, minimum=0.1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {"routine_tasks": {"()": "tgpadmin.logfilters.RoutineTasks"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("TGP_LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        # Celery's lines for each task received and done: not for every heartbeat.
        "celery.app.trace": {"filters": ["routine_tasks"]},
        "celery.worker.strategy": {"filters": ["routine_tasks"]},
    },
}
