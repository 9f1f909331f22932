"""`manage.py check --deploy` passes with a production environment, and the defaults still serve http."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

PRODUCTION = {
    "DJANGO_SECRET_KEY": "x7#Lq2!vR9zP$mW4tY8uK1oN6bH3cF5gJ0dS-eA_iU+lQ=wE2rT",
    "DJANGO_DEBUG": "false",
    "ALLOWED_HOSTS": "millm.example.com",
    "MILLM_API_KEY": "a-long-production-key",
    "MILLM_SECURE_SSL_REDIRECT": "true",
    "MILLM_HSTS_SECONDS": "31536000",
    "MILLM_HSTS_INCLUDE_SUBDOMAINS": "true",
    "MILLM_HSTS_PRELOAD": "true",
    "MILLM_SECURE_COOKIES": "true",
}


def check_deploy(tmp_path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "MILLM_VAR_DIR": str(tmp_path), **env}
    return subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                          cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)


def test_production_settings_pass_the_deploy_check(tmp_path):
    result = check_deploy(tmp_path, **PRODUCTION)
    assert result.returncode == 0, result.stderr + result.stdout


def test_a_short_key_is_flagged(tmp_path):
    result = check_deploy(tmp_path, **{**PRODUCTION, "MILLM_API_KEY": "short"})
    assert result.returncode == 1 and "millm.W002" in result.stderr


def test_the_deploy_check_names_what_a_default_setup_lacks(tmp_path):
    result = check_deploy(tmp_path, **{**PRODUCTION, "MILLM_API_KEY": "", "MILLM_HSTS_SECONDS": "0"})
    assert result.returncode == 1
    assert "millm.W001" in result.stderr and "MILLM_API_KEY" in result.stderr
    assert "security.W004" in result.stderr  # HSTS: MILLM_HSTS_SECONDS
