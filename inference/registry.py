"""Which inference processes are alive and what each one serves.

Each process refreshes a short-TTL heartbeat record in Redis (`<prefix>:<process_id>`, JSON) every
`HEARTBEAT_S`; a process that dies simply expires after `HEARTBEAT_TTL_S`. Readers (`/api/health`, the
System page, the reconcile waiter, `/v1/models`) list the records. Redis rather than the database: a
write every few seconds per process would contend with history writes on SQLite, and expiry is exactly
what a heartbeat needs.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import redis.asyncio as aioredis
from django.conf import settings
from pydantic import BaseModel, Field, ValidationError
from redis.exceptions import RedisError

HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 6.0


class ProcessRecord(BaseModel):
    """One inference process as it last reported itself."""

    process_id: str
    pid: int
    host: str
    channel: str  # its own channel: pings and calls meant for it alone
    pinned_model: str | None = None  # MILLM_INFERENCE_MODEL: serves this model whatever the catalog says
    loaded_model: str | None = None
    attached_sae: str | None = None
    attached_saes: list[str] = Field(default_factory=list)  # every attached SAE's name, in attach order
    steering: str = "none"  # the active steering's label
    queue_depth: int = 0
    active_requests: int = 0
    tokens_per_second: float = 0.0
    requests_total: int = 0  # generations this process has run (shows the load spreading)
    memory_bytes: int | None = None
    started_at: float
    updated_at: float = Field(default_factory=time.time)


def host_name() -> str:
    return socket.gethostname()


def new_process_id() -> str:
    return f"{host_name()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _prefix() -> str:
    # The inference channel name scopes the records, so two stacks sharing one Redis never see each other.
    return f"millm:{settings.INFERENCE_CHANNEL}:process"


def _client() -> aioredis.Redis:
    return aioredis.from_url(settings.REDIS_URL, socket_timeout=2.0, socket_connect_timeout=2.0)


async def heartbeat_write(record: ProcessRecord) -> None:
    record.updated_at = time.time()
    async with _client() as redis:
        await redis.set(f"{_prefix()}:{record.process_id}", record.model_dump_json(), ex=int(HEARTBEAT_TTL_S))


async def heartbeat_remove(process_id: str) -> None:
    async with _client() as redis:
        await redis.delete(f"{_prefix()}:{process_id}")


async def processes_summary() -> list[dict]:
    """Every live process as plain data for pages and /api/health; empty when Redis cannot be read."""
    try:
        return [record.model_dump() for record in await processes_live()]
    except (OSError, RedisError):
        return []


async def models_served() -> set[str] | None:
    """The models the live processes serve; None when no process is on record (or Redis is away)."""
    try:
        records = await processes_live()
    except (OSError, RedisError):
        return None
    return {r.loaded_model for r in records if r.loaded_model} if records else None


async def processes_live() -> list[ProcessRecord]:
    """Every process whose heartbeat has not expired, oldest first (a stable order for pages)."""
    async with _client() as redis:
        keys = [key async for key in redis.scan_iter(match=f"{_prefix()}:*", count=100)]
        values = await redis.mget(keys) if keys else []
    records = []
    for raw in values:
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            records.append(ProcessRecord.model_validate_json(raw))
        except ValidationError:  # a record from an older version: ignore rather than fail the reader
            continue
    return sorted(records, key=lambda r: (r.started_at, r.process_id))
