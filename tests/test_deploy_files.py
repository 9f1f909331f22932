"""docker-compose.yml and the Dockerfile stay consistent with the project (no Docker engine runs here)."""

from pathlib import Path

import yaml
from django.core.management import get_commands

ROOT = Path(__file__).resolve().parent.parent


def test_compose_declares_the_production_topology():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"web", "inference", "worker", "redis", "postgres", "migrate"} <= set(services)
    assert services["inference"]["command"] == ["python", "manage.py", "run_inference"]
    assert services["inference"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["web"]["command"][0] == "daphne" and "millm_site.asgi:application" in services["web"]["command"]
    assert services["worker"]["command"][:3] == ["celery", "-A", "millm_site"]
    env = services["web"]["environment"]
    assert env["DATABASE_URL"].startswith("postgres://") and env["REDIS_URL"].startswith("redis://redis:")


def test_compose_commands_exist():
    commands = get_commands()
    assert "run_inference" in commands and "migrate" in commands


def test_dockerfile_keeps_the_torch_pin():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'TORCH_SPEC="torch==2.13.0"' in dockerfile
    assert "requirements/constraints.txt" in dockerfile
