"""A bad setting stops the process with one line naming it, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("env,named", [
    ({"DATABASE_URL": "mysql://u:secretpw@db/x"}, "DATABASE_URL"),
    ({"DATABASE_URL": "postgres://u@db"}, "DATABASE_URL"),
    ({"REDIS_URL": "http://localhost:6379"}, "REDIS_URL"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"MILLM_INFERENCE_TIMEOUT": "soon"}, "MILLM_INFERENCE_TIMEOUT"),
    ({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG"),
])
def test_bad_setting_gives_one_clear_line(env, named, tmp_path):
    result = run_manage("check", MILLM_VAR_DIR=str(tmp_path), **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("miLLM configuration error: " + named)
    assert "Traceback" not in result.stderr
    assert "secretpw" not in result.stderr


def test_unreachable_redis_stops_serve_with_one_line(tmp_path):
    result = run_manage("serve", "--skip-demo", "--port", "1", MILLM_VAR_DIR=str(tmp_path),
                        REDIS_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 2
    assert result.stderr.strip() == "miLLM configuration error: REDIS_URL=redis://127.0.0.1:1/0 is unreachable " \
                                    "(is the Redis server running?)"


def test_unreachable_database_stops_serve_with_one_line(tmp_path):
    result = run_manage("serve", "--skip-demo", MILLM_VAR_DIR=str(tmp_path),
                        DATABASE_URL="postgres://nobody@127.0.0.1:1/millm")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith("miLLM configuration error: DATABASE_URL cannot be reached")
    assert "\n" not in line and "Traceback" not in result.stderr
