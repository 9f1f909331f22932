"""A real miLLM stack (`manage.py serve`: embedded Redis, daphne, inference process, Celery worker)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ASSET_CACHE

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveStack:
    def __init__(self, var_dir: Path, *, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.var_dir = var_dir
        stack_env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
        stack_env.update({"MILLM_VAR_DIR": str(var_dir), "MILLM_ASSET_CACHE": str(ASSET_CACHE), "MILLM_DEMO_TIER": "test",
                          **(env or {})})
        var_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(var_dir.parent / "serve.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--port", str(self.port), *extra_args],
            cwd=ROOT, env=stack_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_healthy(self, timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited early:\n{self.read_log()}")
            try:
                last = httpx.get(f"{self.url}/api/health", timeout=5).json()
                if last["data"]["status"] == "ok":
                    return last["data"]
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"stack not healthy in {timeout_s}s (last: {last}):\n{self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return (self.var_dir.parent / "serve.log").read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory):
    """One stack for all live tests; each module puts it in the state it needs (load, attach, ...)."""
    stack = LiveStack(tmp_path_factory.mktemp("stack") / "var")
    stack.first_health = stack.wait_healthy()
    yield stack
    stack.stop()


def load_tiny(stack: LiveStack) -> None:
    response = httpx.post(f"{stack.url}/api/models/tiny-llama/load", timeout=300)
    assert response.status_code == 200, response.text
    assert response.json()["data"]["status"] == "loaded"
