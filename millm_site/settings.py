"""miLLM settings: everything configurable comes from the environment, with embedded defaults.

The README's configuration table lists each variable. Embedded defaults: SQLite under var/, a Redis
the supervisor starts on a unix socket under var/, demo assets under var/assets/.
"""

from __future__ import annotations

from pathlib import Path

from millm_site.env import (
    SettingError,
    celery_broker_url,
    database_from_url,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_origins,
    env_path,
    env_str,
    redis_url,
)
from millm_site.logging import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = env_path("MILLM_VAR_DIR", BASE_DIR / "var")

DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = env_str("DJANGO_SECRET_KEY") or "millm-embedded-default-not-for-production"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

# Security (docs/operations.md "Security"). The defaults keep `make run` on http://127.0.0.1 working;
# production behind TLS turns these on and `manage.py check --deploy` says what is still missing.
MILLM_ALLOWED_ORIGINS = env_origins("MILLM_ALLOWED_ORIGINS")  # other sites whose pages may call /api, /v1, /ws
SECURE_SSL_REDIRECT = env_bool("MILLM_SECURE_SSL_REDIRECT", False)
SECURE_REDIRECT_EXEMPT = [r"^api/health$", r"^metrics$"]  # probes may speak plain http inside the cluster
SECURE_HSTS_SECONDS = env_int("MILLM_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("MILLM_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("MILLM_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("MILLM_SECURE_COOKIES", False)
if env_bool("MILLM_BEHIND_TLS_PROXY", False):  # trust the proxy's X-Forwarded-Proto (only behind one)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_AGE = env_int("MILLM_SESSION_AGE_S", 14 * 24 * 3600, minimum=60)
X_FRAME_OPTIONS = "DENY"

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "channels",
    "ninja",  # /api/docs serves Swagger UI from ninja's own static files, not a CDN
    "millm_site",
    "catalog",
    "downloads",
    "inference",
    "steering",
    "profiles",
    "monitoring",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "millm_site.middleware.AccessMiddleware",
]

ROOT_URLCONF = "millm_site.urls"
ASGI_APPLICATION = "millm_site.asgi.application"

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

DATABASE_URL = env_str("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}"
DATABASES = {"default": database_from_url("DATABASE_URL", DATABASE_URL)}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Several processes (web, inference, worker) share the file: wait for locks instead of failing.
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "init_command": "PRAGMA journal_mode=WAL;"}
    DATABASES["default"]["CONN_MAX_AGE"] = 0
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis carries the channel layer (web <-> inference, live pages) and Celery's broker.
EMBEDDED_REDIS_SOCKET = VAR_DIR / "redis.sock"
REDIS_URL_IS_EMBEDDED = not env_str("REDIS_URL")
REDIS_URL = redis_url("REDIS_URL", env_str("REDIS_URL") or f"unix://{EMBEDDED_REDIS_SOCKET}")
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "millm_site.channel_layer.OneTripRedisChannelLayer",
        # socket_timeout=None: redis-py 8 defaults it to 5 s, which breaks the blocking BZPOPMIN of receive().
        "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None}], "capacity": 2000, "expiry": 30},
    }
}
CELERY_BROKER_URL = celery_broker_url(REDIS_URL)
CELERY_RESULT_BACKEND = celery_broker_url(REDIS_URL)
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

MODEL_CACHE_DIR = env_path("MODEL_CACHE_DIR", VAR_DIR / "models")
SAE_CACHE_DIR = env_path("SAE_CACHE_DIR", VAR_DIR / "saes")
DEMO_ASSETS_DIR = env_path("MILLM_ASSET_CACHE", VAR_DIR / "assets")
DEMO_TIER = env_choice("MILLM_DEMO_TIER", "demo", ("demo", "test"))
# auto: `serve` builds the demo without its calibrations and the worker computes them while it serves;
# foreground: the build computes them before serving; background: as auto, and the test tier's SAEs too.
DEMO_CALIBRATION = env_choice("MILLM_DEMO_CALIBRATION", "auto", ("auto", "background", "foreground"))
# Passed as `endpoint=` to huggingface_hub: its own HF_ENDPOINT is frozen when it is first imported.
HF_ENDPOINT = env_str("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
DOWNLOAD_MIN_FREE_BYTES = env_int("MILLM_DOWNLOAD_MIN_FREE_BYTES", 512 * 1024**2, minimum=0)
# HF_TOKEN is read from the environment where a download needs it, never stored or logged.

MILLM_API_KEY = env_str("MILLM_API_KEY")
# Caps what the inference process may use for SAEs (default: what the device has free).
# torch threads in the inference process (0: one fewer than the machine's cores).
TORCH_THREADS = env_int("MILLM_TORCH_THREADS", 0, minimum=0) or None
MEMORY_LIMIT_BYTES = env_int("MILLM_MEMORY_LIMIT_BYTES", 0, minimum=0) or None
INFERENCE_CHANNEL = env_str("MILLM_INFERENCE_CHANNEL", "inference")
INFERENCE_TIMEOUT_S = env_float("MILLM_INFERENCE_TIMEOUT", 5.0, minimum=0.1)
INFERENCE_PROCESSES = env_int("MILLM_INFERENCE_PROCESSES", 1, minimum=1)  # how many `serve` starts
# A request for a model no process serves yet while a process is on record (it is still restoring
# its model after a start) waits this long for it instead of MILLM_INFERENCE_TIMEOUT.
INFERENCE_START_TIMEOUT_S = env_float("MILLM_INFERENCE_START_TIMEOUT", 120.0, minimum=0.1)
# An inference process is always meant to run (`serve` sets it for its children): with none on record yet,
# one is starting, so requests wait the start bound too instead of a 503 after MILLM_INFERENCE_TIMEOUT.
INFERENCE_EXPECTED = env_bool("MILLM_INFERENCE_EXPECTED", False)
# max_tokens: the default when a request leaves it out (or null) and the most one may ask for.
MAX_TOKENS_DEFAULT = env_int("MILLM_MAX_TOKENS_DEFAULT", 1024, minimum=1)
# Prompts (text or chat messages) longer than this many UTF-8 bytes are refused before tokenizing.
MAX_PROMPT_BYTES = env_int("MILLM_MAX_PROMPT_BYTES", 1024 * 1024, minimum=1)
# Tokens per /v1/embeddings request, all inputs together (400 beyond).
EMBED_MAX_TOKENS = env_int("MILLM_EMBED_MAX_TOKENS", 32768, minimum=1)
# Pin an inference process to one model (several GPUs/hosts serving different models behind one /v1).
INFERENCE_MODEL = env_str("MILLM_INFERENCE_MODEL", "")
MONITOR_MAX_HZ = env_float("MILLM_MONITOR_MAX_HZ", 10.0, minimum=0.1)
HISTORY_RETENTION_DAYS = env_int("MILLM_HISTORY_RETENTION_DAYS", 30, minimum=0)  # 0 keeps history forever
SYSTEM_INTERVAL_S = env_float("MILLM_SYSTEM_INTERVAL", 2.0, minimum=0.2)
ALERT_LATENCY_P99_MS = env_float("MILLM_ALERT_LATENCY_P99_MS", 10_000.0, minimum=1.0)
ALERT_ERROR_RATE = env_float("MILLM_ALERT_ERROR_RATE", 0.1, minimum=0.001)  # a fraction of requests
ALERT_MEMORY_PERCENT = env_float("MILLM_ALERT_MEMORY_PERCENT", 90.0, minimum=1.0)
ALERT_COOLDOWN_S = env_float("MILLM_ALERT_COOLDOWN_S", 300.0, minimum=0.0)

LOG_LEVEL = env_choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error"))
LOG_FORMAT = env_choice("LOG_FORMAT", "console", ("console", "json"))
LOGGING = logging_config(level=LOG_LEVEL.upper(), fmt=LOG_FORMAT)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
# daphne serves no static files; the ASGI app does it itself unless a proxy is put in front.
SERVE_STATIC = env_bool("MILLM_SERVE_STATIC", True)

PORT = env_int("PORT", 8000, minimum=1)

__all__ = ["SettingError"]
