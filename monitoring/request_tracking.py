"""What every /v1 request leaves behind when it ends: a history row and the Prometheus counters.

`inference.generation_stream.generate` feeds a RequestTracker each reply message and closes it in its `finally`, so a
completed, failed or abandoned (client gone) request is recorded exactly once, streamed or not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from asgiref.sync import sync_to_async

from monitoring.history import request_record_create
from monitoring.metrics import observe_request

log = structlog.get_logger("millm.requests")


@dataclass
class RequestTracker:
    endpoint: str  # "chat.completions", "completions", "inspect", "compare"
    model: str
    profile: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    steering: dict[str, Any] = field(default_factory=dict)
    prompt: str = ""
    request_id: str = ""
    started_at: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    pieces: list[str] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steering_label: str = "none"
    finished: bool = False

    def see(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "started":
            self.prompt_tokens = message.get("prompt_tokens", 0)
            self.steering_label = message.get("steering", "none")
            self.prompt = message.get("prompt_text") or self.prompt
        elif kind == "chunk":
            if self.first_token_s is None:
                self.first_token_s = time.monotonic() - self.started_at
            self.pieces.append(message["text"])
            self.frames.extend(message.get("frames", ()))
            self.completion_tokens += len(message.get("tokens", ()))
        elif kind == "done":
            self.prompt_tokens = message["usage"]["prompt_tokens"]
            self.completion_tokens = message["usage"]["completion_tokens"]

    @property
    def profile_name(self) -> str:
        """The profile chosen by the request's model name, else the active profile that steered it."""
        if self.profile or not self.steering_label.startswith("profile:"):
            return self.profile
        return self.steering_label.removeprefix("profile:")

    async def finish(self, status: str, error: str = "") -> None:
        if self.finished:
            return
        self.finished = True
        latency_s = time.monotonic() - self.started_at
        observe_request(endpoint=self.endpoint, model=self.model, status=status, latency_s=latency_s,
                        ttft_s=self.first_token_s, prompt_tokens=self.prompt_tokens,
                        completion_tokens=self.completion_tokens)
        try:
            await sync_to_async(request_record_create)(
                request_id=self.request_id, endpoint=self.endpoint, model_name=self.model, profile_name=self.profile_name,
                status=status, prompt=self.prompt, output="".join(self.pieces), parameters=self.params,
                steering={**self.steering, "applied": self.steering_label}, prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens, latency_ms=latency_s * 1000,
                ttft_ms=self.first_token_s * 1000 if self.first_token_s is not None else None,
                # `sae`: which SAE's features a frame holds, while several were attached.
                token_features=[{k: f[k] for k in ("position", "type", "token", "features", "sae") if k in f}
                                for f in self.frames],
                error_message=error)
        except Exception:  # history is a record of the answer, never a reason to fail it
            log.exception("history_write_failed", request_id=self.request_id)
