"""The dedicated inference process: the only process that holds model weights.

It listens on the shared inference channel (any of N processes may take a call) and on its own
channel (cancels for the generations it runs), restores the desired state from the database when
it starts, and drains cleanly on SIGTERM/SIGINT. The torch side is `engine.runtime`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from inference.handlers import WorkerCalls

log = structlog.get_logger("millm.inference")

Handler = Callable[[dict], Awaitable[dict[str, Any] | None]]


class InferenceWorker:
    def __init__(self, *, channel_layer, channel_name: str, runtime=None) -> None:
        self.layer = channel_layer
        self.channel_name = channel_name
        self.own_channel = ""
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self.calls = WorkerCalls(self, runtime)
        self.in_flight: set[asyncio.Task] = set()

    async def serve_until_stopped(self, *, restore: bool = False) -> None:
        self.own_channel = await self.layer.new_channel()
        if restore:
            await self.calls.restore_desired_state()
        log.info("inference_ready", channel=self.channel_name, pid=os.getpid())
        listeners = [asyncio.ensure_future(self._listen(self.channel_name)),
                     asyncio.ensure_future(self._listen(self.own_channel))]
        await self.stopping.wait()
        for listener in listeners:
            listener.cancel()
        await self.calls.shutdown()  # cancels running generations, so their tasks finish quickly
        for task in list(self.in_flight):
            task.cancel()
        await asyncio.gather(*listeners, *self.in_flight, return_exceptions=True)
        log.info("inference_stopped", pid=os.getpid())

    async def run(self) -> None:
        """The process entry point: restore state, serve until SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.serve_until_stopped(restore=True)

    async def _listen(self, channel: str) -> None:
        while True:
            message = await self.layer.receive(channel)
            # Each call runs as its own task: a slow load never blocks a ping or a cancel.
            task = asyncio.ensure_future(self.dispatch(message))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)

    async def dispatch(self, message: dict) -> None:
        kind = message.get("type", "")
        handler: Handler | None = getattr(self.calls, f"call_{kind}", None)
        try:
            if handler is None:
                reply = {"type": "error", "code": "VALIDATION_ERROR", "status": 422,
                         "message": f"unknown inference call {kind!r}"}
            else:
                reply = await handler(message)
        except Exception as exc:  # a failing call must never take the process down
            log.exception("inference_call_failed", call=kind)
            reply = self.calls.error_reply(exc)
        if reply is not None and (reply_channel := message.get("reply_channel")):
            await self.layer.send(reply_channel, reply)

    async def send(self, channel: str, message: dict) -> None:
        await self.layer.send(channel, message)


