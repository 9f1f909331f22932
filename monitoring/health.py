"""What /api/health reports: the database, the broker, and whether an inference process answers."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection

from inference import registry
from inference.client import inference_client
from millm_site.errors import MillmError


def _database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except Exception:
        return False


async def _redis_ok() -> bool:
    client = aioredis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(await client.ping())
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()


async def health_report() -> dict[str, Any]:
    started = time.monotonic()
    database = await sync_to_async(_database_ok)()
    broker = await _redis_ok()
    inference: dict[str, Any] = {"up": False}
    if broker:
        try:
            pong = await inference_client().ping(timeout=min(settings.INFERENCE_TIMEOUT_S, 2.0))
            # The throughput ring (up to 120 samples) has its own endpoint: a health probe stays small.
            inference = {"up": True, **pong.model_dump(exclude={"type", "throughput_samples"})}
        except MillmError as exc:
            inference = {"up": False, "reason": exc.message}
    status = "ok" if database and broker and inference["up"] else ("down" if not database else "degraded")
    return {
        "status": status,
        "database": "ok" if database else "unreachable",
        "redis": "ok" if broker else "unreachable",
        "inference": inference,
        "processes": await registry.processes_summary() if broker else [],  # every inference process on record
        "checked_in_ms": round((time.monotonic() - started) * 1000, 1),
    }
