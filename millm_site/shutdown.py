"""The web process is stopping: what daphne's SIGTERM/SIGINT turns into for the code still answering.

daphne (4.x) stops in Twisted's "before shutdown" phase: it cancels every application instance and waits
for them, and only then closes the connections. A cancel alone would cut an SSE stream mid-way (no error
event, no `[DONE]`), so `graceful_http` (millm_site/asgi.py) shields the request from that cancel, tells
the streams through `wait()` (serving/completions.py ends them with an error event and `[DONE]`), gives
the rest `GRACE_S` to finish, and answers a 503 for what had not started its response by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

# Below the supervisor's 10 s between SIGTERM and SIGKILL (millm_site/supervisor.py), with room to spare.
GRACE_S = 5.0
SHUTDOWN_MESSAGE = "The server is shutting down; retry the request"

_stopping = False
_waiters: set[asyncio.Future] = set()


def begin() -> None:
    """Mark the process as stopping and wake everything in `wait()`."""
    global _stopping
    _stopping = True
    for waiter in list(_waiters):
        if not waiter.done():
            waiter.get_loop().call_soon_threadsafe(_resolve, waiter)


def _resolve(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def stopping() -> bool:
    return _stopping


async def wait() -> None:
    """Return once the process starts stopping (at once if it already has); a future per waiter, so any
    event loop can wait (an asyncio.Event binds to the first loop that waits on it)."""
    if _stopping:
        return
    waiter = asyncio.get_running_loop().create_future()
    _waiters.add(waiter)
    try:
        await waiter
    finally:
        _waiters.discard(waiter)


def install_daphne_trigger() -> None:
    """Run `begin()` when daphne's reactor starts stopping, before daphne cancels the requests.

    Only under daphne: importing twisted.internet.reactor anywhere else would install Twisted's default
    reactor and break a daphne started later in the same process."""
    if "twisted.internet.reactor" not in sys.modules:
        return
    from twisted.internet import reactor

    reactor.addSystemEventTrigger("before", "shutdown", begin)


ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


def _unavailable_body(path: str) -> bytes:
    if path.startswith("/v1/"):
        body: dict[str, Any] = {"error": {"message": SHUTDOWN_MESSAGE, "type": "server_error", "param": None,
                                          "code": "service_unavailable"}}
    else:
        body = {"success": False, "data": None,
                "error": {"code": "INFERENCE_UNAVAILABLE", "message": SHUTDOWN_MESSAGE, "details": {}}}
    return json.dumps(body).encode()


def graceful_http(app: ASGIApp, *, grace_s: float = GRACE_S) -> ASGIApp:
    """Wrap an HTTP ASGI app so the server's shutdown cancel becomes a notice and a grace period.

    A cancel while the process is not stopping (daphne gives up on a request whose client left) passes
    through unchanged."""

    async def wrapped(scope: dict, receive: Callable, send: Callable) -> None:
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message.get("type") == "http.response.start"
            await send(message)

        task = asyncio.ensure_future(app(scope, receive, tracking_send))
        try:
            await asyncio.shield(task)
            return
        except asyncio.CancelledError:
            if task.done() or not _stopping:
                task.cancel()
                raise
        # Stopping: the streams were told (begin() ran first); let them write their closing events.
        await asyncio.wait({task}, timeout=grace_s)
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if not started:
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5")]})
                await send({"type": "http.response.body", "body": _unavailable_body(scope.get("path", ""))})
            return
        with contextlib.suppress(asyncio.CancelledError):
            task.result()

    return wrapped
