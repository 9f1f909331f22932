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

import structlog
from pydantic import ValidationError

from inference import messages as m
from inference.handlers import WorkerCalls, error_reply

log = structlog.get_logger("millm.inference")

LAYER_LOST_EXIT_S = 30.0  # Redis away longer than this: exit (exit code 3) and be restarted

Handler = Callable[[m.Message], Awaitable[m.Message | None]]


class InferenceWorker:
    def __init__(self, *, channel_layer, channel_name: str, runtime=None) -> None:
        self.layer = channel_layer
        self.channel_name = channel_name
        self.own_channel = ""
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self.calls = WorkerCalls(self, runtime)
        self.in_flight: set[asyncio.Task] = set()
        self.layer_lost = False

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
        if self.layer_lost:
            raise SystemExit(3)  # the supervisor (or the container's restart policy) starts a fresh one

    async def _listen(self, channel: str) -> None:
        lost_since: float | None = None
        while True:
            try:
                message = await self.layer.receive(channel)
            except Exception as exc:
                # Redis is away (restarting?): an unhandled error here would leave the process alive but
                # deaf. The layer reconnects on its next call, so retry and keep the loaded model; if Redis
                # stays away, exit so the supervisor (or the container) starts a fresh process.
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > LAYER_LOST_EXIT_S:
                    log.error("inference_channel_layer_lost", channel=channel, error=exc.__class__.__name__)
                    self.layer_lost = True
                    self.stopping.set()
                    return
                log.warning("inference_channel_layer_retry", channel=channel, error=exc.__class__.__name__)
                await asyncio.sleep(0.5)
                continue
            lost_since = None
            # Each call runs as its own task: a slow load never blocks a ping or a cancel.
            task = asyncio.ensure_future(self.dispatch(message))
            self.in_flight.add(task)
            task.add_done_callback(self.in_flight.discard)

    async def dispatch(self, message: dict) -> None:
        """Validate one received call, run it, send its reply: a malformed call gets an error reply."""
        reply_channel = message.get("reply_channel") if isinstance(message, dict) else None
        kind = message.get("type", "") if isinstance(message, dict) else ""
        reply: m.Message | None
        try:
            call = m.parse_call(message)
        except ValidationError as exc:
            text, param = m.validation_problem(exc)
            log.warning("inference_call_malformed", call=str(kind)[:64], problem=text)
            reply = m.Error(code="VALIDATION_ERROR", status=422, message=f"malformed {str(kind)[:64]!r} call: {text}",
                            param=param)
        else:
            handler: Handler = getattr(self.calls, f"call_{call.type}")
            try:
                reply = await handler(call)
            except Exception as exc:  # a failing call must never take the process down
                reply = error_reply(exc)
                if reply.status < 500:  # a refusal (bad input, wrong state): one quiet line, never the prompt
                    log.info("inference_call_refused", call=call.type, code=reply.code, status=reply.status)
                else:
                    log.exception("inference_call_failed", call=call.type)
        if reply is not None and isinstance(reply_channel, str) and reply_channel:
            await self.layer.send(reply_channel, reply.model_dump())

    async def send(self, channel: str, message: dict) -> None:
        await self.layer.send(channel, message)


