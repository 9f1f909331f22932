"""The dedicated inference process: the only process that holds model weights.

N of them may run side by side. Each one listens on
- the shared inference channel (any process may take a call there: pings, statistics, and requests
  for a model nobody serves, which get the refusal),
- its own channel: the generations and embeddings the web tier routes to it (inference/client.py picks
  the least busy process serving the model), cancels, leases and liveness pings for them, and the
  broadcast management calls that reach it through the control group (`messages.control_group`).
It restores the desired state from the database when it starts, refreshes its heartbeat record
(inference/registry.py) every few seconds, and drains cleanly on SIGTERM/SIGINT. A process may be
pinned to one model (MILLM_INFERENCE_MODEL). The torch side is `engine.runtime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable

import structlog
from pydantic import ValidationError

from inference import messages as m
from inference import registry
from inference.handlers import WorkerCalls, error_reply

log = structlog.get_logger("millm.inference")

LAYER_LOST_EXIT_S = 30.0  # Redis away longer than this: exit (exit code 3) and be restarted

Handler = Callable[[m.Message], Awaitable[m.Message | None]]


class InferenceWorker:
    def __init__(self, *, channel_layer, channel_name: str, runtime=None, pinned_model: str | None = None) -> None:
        self.layer = channel_layer
        self.channel_name = channel_name
        self.own_channel = ""
        self.process_id = registry.new_process_id()
        self.pinned_model = pinned_model or None
        self.started_at = time.time()
        self.stopping = asyncio.Event()
        self.listening = asyncio.Event()  # joined the control group, on record and receiving
        self.calls = WorkerCalls(self, runtime)
        self.in_flight: set[asyncio.Task] = set()
        self.layer_lost = False

    async def serve_until_stopped(self, *, restore: bool = False) -> None:
        self.own_channel = await self.layer.new_channel()
        await self.layer.group_add(m.control_group(self.channel_name), self.own_channel)
        # On record while it restores its model: the web tier then knows a process is starting and lets
        # requests for that model wait for it (MILLM_INFERENCE_START_TIMEOUT) instead of a quick 503.
        heartbeat = asyncio.ensure_future(self._heartbeat())
        if restore:
            await self.calls.restore_desired_state()
        log.info("inference_ready", channel=self.channel_name, pid=os.getpid(), process_id=self.process_id,
                 pinned_model=self.pinned_model)
        with contextlib.suppress(Exception):  # the model's route appears now, not at the next beat
            await registry.heartbeat_write(self.heartbeat_record())
        listeners = [asyncio.ensure_future(self._listen(self.channel_name)),
                     asyncio.ensure_future(self._listen(self.own_channel)), heartbeat]
        self.listening.set()
        await self.stopping.wait()
        for listener in listeners:
            listener.cancel()
        await self._leave()
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

    def heartbeat_record(self) -> registry.ProcessRecord:
        status = self.calls.runtime.status()
        return registry.ProcessRecord(
            process_id=self.process_id, pid=os.getpid(), host=registry.host_name(), channel=self.own_channel,
            pinned_model=self.pinned_model, started_at=self.started_at,
            **{key: status[key] for key in ("loaded_model", "attached_sae", "steering", "queue_depth",
                                            "active_requests", "tokens_per_second", "requests_total",
                                            "memory_bytes")},
            attached_saes=[sae["name"] for sae in status.get("attached_saes") or ()])

    async def _heartbeat(self) -> None:
        while True:
            try:
                await registry.heartbeat_write(self.heartbeat_record())
            except Exception as exc:  # Redis away: the next beat tries again; expiry says we are gone meanwhile
                log.warning("inference_heartbeat_failed", error=exc.__class__.__name__)
            await asyncio.sleep(registry.HEARTBEAT_S)

    async def _leave(self) -> None:
        """Tell the others at once that this process is gone, instead of waiting for its record to expire."""
        try:
            await registry.heartbeat_remove(self.process_id)
            await self.layer.group_discard(m.control_group(self.channel_name), self.own_channel)
        except Exception as exc:  # Redis away while stopping: the record expires by itself
            log.warning("inference_leave_failed", error=exc.__class__.__name__)

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
            broadcast = getattr(call, "broadcast", False)
            if broadcast and isinstance(reply_channel, str) and reply_channel:
                await self.layer.send(reply_channel, m.Received(process_id=self.process_id).model_dump())
            handler: Handler = getattr(self.calls, f"call_{call.type}")
            try:
                reply = await handler(call)
            except Exception as exc:  # a failing call must never take the process down
                reply = error_reply(exc)
                if reply.status < 500:  # a refusal (bad input, wrong state): one quiet line, never the prompt
                    log.info("inference_call_refused", call=call.type, code=reply.code, status=reply.status)
                else:
                    log.exception("inference_call_failed", call=call.type)
            if reply is not None and broadcast:
                reply = m.Applied(process_id=self.process_id, reply=reply.model_dump())
        if reply is not None and isinstance(reply_channel, str) and reply_channel:
            await self.layer.send(reply_channel, reply.model_dump())

    async def send(self, channel: str, message: dict) -> None:
        await self.layer.send(channel, message)


