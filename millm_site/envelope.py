"""The management API's envelope: `{success, data, error}` for every answer under /api."""

from __future__ import annotations

from typing import Any


def envelope(data: Any) -> dict[str, Any]:
    return {"success": True, "data": data, "error": None}


def error_envelope(code: str, message: str, details: dict | None = None) -> dict[str, Any]:
    return {"success": False, "data": None, "error": {"code": code, "message": message, "details": details or {}}}
