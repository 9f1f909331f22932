"""The dedicated inference process: the only process that holds model weights.

It listens on the named inference channel, answers management calls (ping/status now; load,
generate, steering as the serving issues land) and drains cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger("millm.inference")

Handler = Callable[[dict], Awaitable[dict[str, Any]]]


class InferenceWorker:
    def __init__(self, *, channel_layer, channel_name: str) -> None:
        self.layer = channel_layer
        self.channel_name = channel_name
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self.handlers: dict[str, Handler] = {"ping": self.handle_ping}

    async def handle_ping(self, message: dict) -> dict[str, Any]:
        return {
            "type": "pong",
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "loaded_model": None,
        }

    async def run(self) -> None:
        """The process entry point: serve until SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.serve_until_stopped()

    async def serve_until_stopped(self) -> None:
        log.info("inference_ready", channel=self.channel_name, pid=os.getpid())
        stop_wait = asyncio.ensure_future(self.stopping.wait())
        while not self.stopping.is_set():
            receive = asyncio.ensure_future(self.layer.receive(self.channel_name))
            done, _ = await asyncio.wait({receive, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                receive.cancel()
                break
            await self.dispatch(receive.result())
        log.info("inference_stopped", pid=os.getpid())

    async def dispatch(self, message: dict) -> None:
        handler = self.handlers.get(message.get("type", ""))
        if handler is None:
            reply = {"type": "error", "code": "VALIDATION_ERROR", "status": 422,
                     "message": f"unknown inference call {message.get('type')!r}"}
        else:
            try:
                reply = await handler(message)
            except Exception as exc:  # a failing call must never take the process down
                log.exception("inference_call_failed", call=message.get("type"))
                reply = {"type": "error", "code": "INTERNAL_ERROR", "status": 500, "message": exc.__class__.__name__}
        if reply_channel := message.get("reply_channel"):
            await self.layer.send(reply_channel, reply)
