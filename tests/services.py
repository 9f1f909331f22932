"""Real Redis and PostgreSQL servers for the test session, started before Django reads its settings.

Loaded as a pytest plugin (`-p tests.services` in pyproject.toml) so its hook runs before
pytest-django imports the settings: REDIS_URL / DATABASE_URL point at these throwaway servers.
Set REDIS_URL yourself to use an existing Redis; MILLM_TEST_POSTGRES=1 adds a PostgreSQL cluster.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

_started: list[subprocess.Popen] = []
_cleanups: list = []


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config, parser, args):
    # A wrapper runs before pytest-django's own hook, which imports the settings.
    _start_services()
    return (yield)


def _start_services() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="millm-test-"))
    _cleanups.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
    os.environ.setdefault("MILLM_VAR_DIR", str(workdir / "var"))
    os.environ.setdefault("LOG_LEVEL", "warning")
    if not os.environ.get("REDIS_URL"):
        os.environ["REDIS_URL"] = start_redis(workdir)
    if os.environ.get("MILLM_TEST_POSTGRES") == "1":
        os.environ["DATABASE_URL"] = start_postgres(workdir)


def start_redis(workdir: Path) -> str:
    from millm_site.embedded_redis import redis_reachable

    server = shutil.which("redis-server")
    if server is None:
        from millm_site.embedded_redis import redis_server_binary

        server = redis_server_binary()
    sock = workdir / "redis.sock"
    process = subprocess.Popen(
        [server, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
    )
    _started.append(process)
    url = f"unix://{sock}"
    deadline = time.monotonic() + 10
    while not redis_reachable(url, timeout_s=0.2):
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError("test redis-server did not start")
        time.sleep(0.05)
    return url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_postgres(workdir: Path) -> str:
    bindir = next(Path("/usr/lib/postgresql").glob("*/bin"), None)
    if bindir is None:
        raise RuntimeError("MILLM_TEST_POSTGRES=1 but no PostgreSQL server is installed (apt-get install postgresql)")
    data = workdir / "pg"
    data.mkdir()
    runas = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if runas:
        shutil.chown(workdir, "postgres")
        shutil.chown(data, "postgres")
    port = _free_port()
    subprocess.run([*runas, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        [*runas, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"), "-o",
         f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off -c full_page_writes=off", "start"],
        check=True, stdout=subprocess.DEVNULL,
    )
    _cleanups.append(lambda: subprocess.run([*runas, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                             "stop"], stdout=subprocess.DEVNULL, check=False))
    return f"postgres://postgres@127.0.0.1:{port}/millm"


def _stop_all() -> None:
    for process in _started:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
    for cleanup in reversed(_cleanups):
        cleanup()


atexit.register(_stop_all)
