"""Tiny typed readers for environment settings that fail loudly, naming the setting.

A bad value stops the process with one line (see `SettingError` handling in manage.py and asgi.py),
never with a traceback from deep inside Django.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse


class SettingError(Exception):
    """A setting from the environment is unusable; the message names it."""


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise SettingError(f"{name}={raw!r} is not a boolean (use true/false)")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise SettingError(f"{name}={value} must be at least {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise SettingError(f"{name}={value} must be at least {minimum}")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default).lower()
    if value not in choices:
        raise SettingError(f"{name}={value!r} must be one of: {', '.join(choices)}")
    return value


def env_list(name: str, default: str = "") -> list[str]:
    """A comma-separated list, blanks dropped."""
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def env_origins(name: str) -> list[str]:
    """Comma-separated origins (`scheme://host[:port]`), lower-cased without a trailing slash."""
    origins = [origin.rstrip("/").lower() for origin in env_list(name)]
    for origin in origins:
        parsed = urlparse(origin)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path:
            raise SettingError(f"{name}: {origin!r} is not an origin like https://host:port")
    return origins


def env_path(name: str, default: Path) -> Path:
    raw = env_str(name)
    return Path(raw).expanduser().resolve() if raw else default


SUPPORTED_DATABASE_SCHEMES = ("sqlite", "postgres", "postgresql", "pgsql")


def database_from_url(name: str, url: str) -> dict:
    import dj_database_url

    scheme = urlparse(url).scheme.split("+")[0]
    if scheme not in SUPPORTED_DATABASE_SCHEMES:
        raise SettingError(
            f"{name}={_redact(url)} has unsupported scheme {scheme!r} "
            f"(use one of: {', '.join(SUPPORTED_DATABASE_SCHEMES)})"
        )
    try:
        config = dj_database_url.parse(url, conn_max_age=60, conn_health_checks=True)
    except Exception as exc:  # dj-database-url raises several types for malformed URLs
        raise SettingError(f"{name}={_redact(url)} cannot be parsed: {exc}") from None
    if scheme != "sqlite" and not config.get("NAME"):
        raise SettingError(f"{name}={_redact(url)} names no database")
    return config


SUPPORTED_REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_url(name: str, url: str) -> str:
    scheme = urlparse(url).scheme
    if scheme not in SUPPORTED_REDIS_SCHEMES:
        raise SettingError(
            f"{name}={_redact(url)} has unsupported scheme {scheme!r} "
            f"(use one of: {', '.join(SUPPORTED_REDIS_SCHEMES)})"
        )
    return url


def celery_broker_url(url: str) -> str:
    """Kombu spells a Redis unix socket `redis+socket://`; redis-py and channels spell it `unix://`."""
    if url.startswith("unix://"):
        return "redis+socket://" + url.removeprefix("unix://")
    return url


def _redact(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url
