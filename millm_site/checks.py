"""miLLM's own `manage.py check --deploy` rules, next to Django's security checks."""

from __future__ import annotations

from django.conf import settings
from django.core import checks

MIN_KEY_LENGTH = 16


@checks.register(checks.Tags.security, deploy=True)
def api_key_check(app_configs, **kwargs) -> list[checks.CheckMessage]:
    key = settings.MILLM_API_KEY
    if not key:
        return [checks.Warning(
            "MILLM_API_KEY is not set: anyone who can reach this server can read its history, steer and load models.",
            hint="Set MILLM_API_KEY to a long random string (docs/operations.md, Security).", id="millm.W001")]
    if len(key) < MIN_KEY_LENGTH:
        return [checks.Warning(f"MILLM_API_KEY is shorter than {MIN_KEY_LENGTH} characters.",
                               hint="Use a long random string, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`.",
                               id="millm.W002")]
    return []
