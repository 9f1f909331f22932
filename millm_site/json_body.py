"""The JSON body parser of both APIs: plain `json.loads`, then refuse strings no encoder can write.

JSON's `\\ud800` escape decodes to a lone surrogate, a Python str that cannot be encoded as UTF-8:
it would fail later, deep in msgpack or the database driver, as a 500. Refused here as a 400 that
names the field.
"""

from __future__ import annotations

import json
from typing import Any

from ninja.parser import Parser


class BadJsonBody(ValueError):
    """A body that parsed as JSON but holds something no later step can use; `param` names where."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def unencodable_path(value: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """Where in a parsed JSON value the first string (or key) with a lone surrogate is, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = unencodable_path(key, path) if isinstance(key, str) else None
            found = found if found is not None else unencodable_path(item, (*path, str(key)))
            if found is not None:
                return found
    elif isinstance(value, list):
        for position, item in enumerate(value):
            found = unencodable_path(item, (*path, str(position)))
            if found is not None:
                return found
    return None


class StrictJsonParser(Parser):
    def parse_body(self, request) -> Any:
        data = json.loads(request.body)
        where = unencodable_path(data)
        if where is not None:
            param = ".".join(where) or None
            raise BadJsonBody(f"{param or 'body'}: contains a lone UTF-16 surrogate (not valid Unicode text)",
                              param=param)
        return data
