"""The one settings module. Everything that differs between a laptop and production is an environment
variable; the defaults run with nothing installed (the embedded PostgreSQL and a filesystem broker under
``var/``)."""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from axiom_grid import embedded_postgres

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("AXIOM_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)
# The fallback key is public: good for a laptop and the test suite only. With DEBUG off, the web process,
# the worker and beat refuse to start without SECRET_KEY (axiom_grid.startup).
SECRET_KEY_IS_SET = bool(os.environ.get("SECRET_KEY"))
SECRET_KEY = os.environ.get("SECRET_KEY") or "insecure-local-development-key-change-me-in-production"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

# Feature flags of the product description, all on unless switched off.
ENABLE_SUPERPOWERS_TRACKING = env_bool("ENABLE_SUPERPOWERS_TRACKING", True)
ENABLE_PERFORMANCE_ANALYTICS = env_bool("ENABLE_PERFORMANCE_ANALYTICS", True)
ENABLE_MARKETPLACE_OPTIMIZATION = env_bool("ENABLE_MARKETPLACE_OPTIMIZATION", True)
ENABLE_COLLABORATION_SHARING = env_bool("ENABLE_COLLABORATION_SHARING", True)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.postgres",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "axiom_grid.apps.AxiomGridConfig",  # the database checks, nothing else
    "ledger",
    "allocation",
    "optimization",
]

# Django's order. Sessions, CSRF, auth and messages skip API calls under /api/ (axiom_grid/middleware.py).
# The request id and the HTTP metrics come first, so they cover every answer, the other middleware's too.
MIDDLEWARE = [
    "axiom_grid.observability.middleware.RequestObservabilityMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "axiom_grid.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "axiom_grid.middleware.CsrfViewMiddleware",
    "axiom_grid.middleware.AuthenticationMiddleware",
    "axiom_grid.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# Django's W003 looks for the CSRF middleware by its path; axiom_grid.apps checks for the subclass above.
SILENCED_SYSTEM_CHECKS = ["security.W003"]

ROOT_URLCONF = "axiom_grid.urls"
WSGI_APPLICATION = "axiom_grid.wsgi.application"
ASGI_APPLICATION = "axiom_grid.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database: PostgreSQL only ---------------------------------------------------------------------------
# The PostgreSQL major versions the code runs and is tested on, oldest and newest: the embedded server is 18,
# CI also runs on 15. The `axiom_grid` check refuses an older server and warns about a newer one.
POSTGRESQL_VERSIONS = (15, 18)
# Without DATABASE_URL: the embedded server under var/ (axiom_grid/embedded_postgres.py), which `make run`,
# `make test` and `python -m axiom_grid.embedded_postgres -- <command>` start and stop.
EMBEDDED_POSTGRES_DIR = VAR_DIR / "postgres"
DATABASE_URL = os.environ.get("DATABASE_URL", "")
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL or embedded_postgres.settings_url(EMBEDDED_POSTGRES_DIR),
        # One persistent connection per gunicorn thread and Celery process, checked before reuse.
        conn_max_age=60,
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise ImproperlyConfigured(
        f"DATABASE_URL must name a PostgreSQL {POSTGRESQL_VERSIONS[0]}-{POSTGRESQL_VERSIONS[1]} server "
        "(postgres://USER:PASSWORD@HOST:PORT/NAME), or be unset for the embedded one; PostgreSQL is the only "
        "database."
    )
# What sits between the grid and PostgreSQL (docs/scaling.md). Unset: a direct connection, or a pooler in
# session mode. psycopg then prepares a statement on the server after 5 runs in a connection (Django turns
# that off by default); only the cursors of ledger.bulk.server_bound_cursor (the allocation's call, the
# batches' arrays) can be prepared, Django's own cursors bind on the client and never are.
# A pooler in transaction mode hands each transaction to any server connection, so nothing may outlive a
# transaction in the session: Django's server-side cursors (WITH HOLD outside a transaction) are turned off,
# and so are prepared statements with "transaction" (PgBouncer < 1.21, or max_prepared_statements = 0:
# parameters are still bound on the server, in unnamed statements), kept with "transaction-prepared"
# (PgBouncer >= 1.21 with max_prepared_statements > 0, which follows psycopg's protocol-level statements).
DATABASE_POOLER = os.environ.get("DATABASE_POOLER", "").strip().lower()
DATABASE_POOLERS = ("", "session", "transaction", "transaction-prepared")
if DATABASE_POOLER not in DATABASE_POOLERS:
    raise ImproperlyConfigured(
        f"DATABASE_POOLER must be one of {', '.join(repr(name) for name in DATABASE_POOLERS[1:])} or unset, "
        f"not {DATABASE_POOLER!r}"
    )
DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = (
    None if DATABASE_POOLER == "transaction" else 5
)
if DATABASE_POOLER.startswith("transaction"):
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: broker and cache ----------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
# Every key the grid writes to Redis (cache, broker queues, task results) starts with this prefix, so that
# several deployments, or a benchmark beside the service, can share one Redis database.
REDIS_KEY_PREFIX = os.environ.get("REDIS_KEY_PREFIX", "")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": REDIS_KEY_PREFIX,
        }
    }
    CELERY_BROKER_URL = REDIS_URL
    CELERY_RESULT_BACKEND = REDIS_URL
    _key_prefix = {"global_keyprefix": REDIS_KEY_PREFIX} if REDIS_KEY_PREFIX else {}
    CELERY_BROKER_TRANSPORT_OPTIONS: dict = {"visibility_timeout": 3600, **_key_prefix}
    CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS: dict = {**_key_prefix}
else:
    # kombu's filesystem transport: a broker that needs no server, shared by web, worker and beat.
    BROKER_DIR = VAR_DIR / "broker"
    for sub in ("out", "processed", "control"):
        (BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
        }
    }
    CELERY_BROKER_URL = "filesystem://localhost//"  # the host means nothing here; without one kombu warns
    CELERY_RESULT_BACKEND = None
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "out"),
        "data_folder_out": str(BROKER_DIR / "out"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),  # kombu's default is ./control
        "store_processed": False,
    }

CELERY_TIMEZONE = "UTC"
CELERY_ENABLE_UTC = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = 300
CELERY_TASK_SOFT_TIME_LIMIT = 240
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# --- Auth, i18n, static ---------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "admin:login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns on every start without it
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").is_dir() else []
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        # Hashed, compressed files need `collectstatic` first: the Docker image does it and sets this.
        if env_bool("STATIC_MANIFEST", False)
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = True

# --- Email (alerts) -------------------------------------------------------------------------------------
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "25"))
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "grid@axiom.local")
ALERT_EMAILS = env_list("ALERT_EMAILS", "")  # every alert is also emailed to these addresses

# --- REST framework -------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["allocation.api.shared.parsers.GridJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "allocation.api.shared.schema.GridAutoSchema",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "EXCEPTION_HANDLER": "allocation.api.shared.errors.exception_handler",
    "DEFAULT_AUTHENTICATION_CLASSES": ["allocation.api.shared.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["allocation.api.shared.auth.IsAuthenticatedPrincipal"],
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Axiom Energy Grid API",
    "DESCRIPTION": "Quota checks, allocations, holds, sharing and cost for AI agents. Every error answers "
    '`{"error": {"code", "message", "details"}}`. Request bodies are JSON objects whose strings '
    "may not hold NUL characters or unpaired surrogates, nested at most 32 levels (400 `malformed_json`).",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "AgentStatusEnum": "ledger.models.Agent.Status",
        "AllocationStatusEnum": "allocation.models.Allocation.Status",
    },
    # A CharField that does not allow blank refuses "": the schema says minLength 1.
    "ENFORCE_NON_BLANK_FIELDS": True,
    # Swagger UI keeps the key entered in "Authorize" across reloads, for "Try it out" on every route.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "persistAuthorization": True},
}

# /metrics answers operators' keys. A Celery worker running apart from the web processes (a container of its
# own) also serves them, without a key, on this host:port (axiom_grid/observability/exposition.py).
METRICS_BIND = os.environ.get("METRICS_BIND", "")

# Plain text (the message alone), or JSON lines with LOG_FORMAT=json: each with its time, level, logger, and
# the request id or task id of the request or task it belongs to (axiom_grid/observability/logs.py).
LOG_FORMAT = os.environ.get("LOG_FORMAT", "text").strip().lower() or "text"
if LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be text or json, not {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "no_503_lines": {"()": "axiom_grid.log_filters.ServiceUnavailableNotLogged"},
        "context": {"()": "axiom_grid.observability.logs.ContextFilter"},
    },
    "formatters": {"json": {"()": "axiom_grid.observability.logs.JsonFormatter"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "filters": ["context"],
            **({"formatter": "json"} if LOG_FORMAT == "json" else {}),
        }
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        # Configured here to drop the console handler Django's defaults give it under DEBUG: its lines reach
        # the root's handler once, in the chosen format.
        "django": {"level": "INFO"},
        "django.db.backends": {"level": "INFO"},
        "django.request": {"filters": ["no_503_lines"]},
    },
}

if not DEBUG:
    SESSION_COOKIE_HTTPONLY = True
    SECURE_CONTENT_TYPE_NOSNIFF = True
    X_FRAME_OPTIONS = "DENY"

# --- HTTPS in production (README: "Running in production") ----------------------------------------------
# Behind a proxy that terminates TLS and sets X-Forwarded-Proto (and strips it from clients' requests).
if env_bool("TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("SECURE_COOKIES", False)
SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", "0"))
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)

# --- Partitions and retention (docs/operations.md) ------------------------------------------------------
# The periodic task ledger.partitions_maintain keeps this many months of partitions ready after the current.
GRID_PARTITIONS_AHEAD_MONTHS = int(os.environ.get("GRID_PARTITIONS_AHEAD_MONTHS", "3"))


def env_months(name: str, default: int | None) -> int | None:
    """Months of retention from the environment: a whole number, or "forever" (also empty) for None."""
    value = os.environ.get(name)
    if value is None:
        return default
    value = value.strip().lower()
    if value in {"", "forever", "none"}:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ImproperlyConfigured(
            f"{name} must be a number of months (at least 1) or 'forever', not {value!r}"
        )
    return int(value)


# How many whole months before the current one each table keeps; None keeps every row. The money records
# (usage log, allocations) and the audit trail are kept by default; operators' records of what the grid did
# (executions, scaling events, alerts) for 13 months, a year to compare with and the month in progress.
GRID_RETENTION = {
    "usage_logs": env_months("GRID_RETENTION_USAGE_LOGS", None),
    "allocations": env_months("GRID_RETENTION_ALLOCATIONS", None),
    "audit_trail": env_months("GRID_RETENTION_AUDIT_TRAIL", None),
    "executions": env_months("GRID_RETENTION_EXECUTIONS", 13),
    "scaling_events": env_months("GRID_RETENTION_SCALING_EVENTS", 13),
    "alerts": env_months("GRID_RETENTION_ALERTS", 13),
}
# A directory: each partition that retention drops is first written there as <partition>.csv.gz. Empty: none.
GRID_RETENTION_DUMP_DIR = os.environ.get("GRID_RETENTION_DUMP_DIR", "")


def env_positive_int(name: str, default: int) -> int:
    """A whole number of at least 1 from the environment, else ``default``."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ImproperlyConfigured(f"{name} must be a whole number of at least 1, not {value!r}")
    return int(value)


# --- Usage rollups (docs/operations.md, "Rollups") ---------------------------------------------------------
# An hour is sealed once it ended this long ago: a usage row committed later than this after its time is
# counted only by a run within the lookback, or by the backfill.
USAGE_ROLLUP_LATE_SECONDS = env_positive_int("USAGE_ROLLUP_LATE_SECONDS", 2 * 3600)
# How far back a run recomputes the hours of rows that arrived late (written before the range it covers).
USAGE_ROLLUP_LOOKBACK_SECONDS = env_positive_int("USAGE_ROLLUP_LOOKBACK_SECONDS", 7 * 24 * 3600)
# Hours recomputed per transaction.
USAGE_ROLLUP_CHUNK_HOURS = env_positive_int("USAGE_ROLLUP_CHUNK_HOURS", 1)
