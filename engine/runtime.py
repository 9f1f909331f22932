"""Everything the inference process holds, behind one object: the loaded model and its scheduler,
the SAE hook, and the active steering. No Django here; `inference/process.py` drives it.

Blocking methods (load, attach) are meant for a worker thread; model surgery runs on the
scheduler's loop thread between forward passes (`scheduler.call`), so no request sees half a change.
"""

from __future__ import annotations

import gc
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors.torch import load_file

from engine.activation_frames import FrameBuilder
from engine.chat import build_chat_prompt
from engine.embeddings import EmbeddingResult
from engine.errors import InsufficientMemoryError, ModelNotLoadedError, SaeNotAttachedError
from engine.feature_stats import METRICS
from engine.generation import GenerationRequest, RequestHandle
from engine.loading import LoadedModel, check_loadable, load_model
from engine.request_features import FeatureRequest, validate_feature_request
from engine.sae import SaeWeights, load_sae
from engine.sae_hook import SaeHook
from engine.sampling import InvalidRequestError, SamplingParams
from engine.scheduler import GenerationScheduler
from engine.steering import CompiledSteering, SteeringSpec, compile_steering
from engine.steering_conditions import CompiledConditions, SteeringConditions, compile_conditions
from engine.steering_layers import NORM_PROBE_TEXT, LayerSteeringHook, residual_norms
from engine.throughput import ThroughputSampler


def default_torch_threads() -> int:
    """One core fewer than the machine has: the web tier, the worker and Redis need one, and OpenMP
    threads that spin-wait for a busy core cost far more than they compute (seen 5x on 2 cores)."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True)
class Submitted:
    handle: RequestHandle
    steering_label: str  # "none", "active", "profile:<name>", "inline"
    prompt_text: str
    frames: FrameBuilder | None  # set when the request is monitored
    features: FrameBuilder | None = None  # set when the request asks for its own features (return_features)


@dataclass
class MonitoringSettings:
    enabled: bool = True  # monitor every request while an SAE is attached
    top_k: int = 10
    features: tuple[int, ...] = ()  # always reported, whatever their rank


class EngineRuntime:
    def __init__(self, *, max_batch_size: int = 16, memory_limit_bytes: int | None = None,
                 torch_threads: int | None = None, max_tokens_default: int | None = None,
                 max_prompt_bytes: int | None = None, max_embed_tokens: int | None = None) -> None:
        torch.set_num_threads(torch_threads or default_torch_threads())
        self.max_batch_size = max_batch_size
        self.max_tokens_default = max_tokens_default  # MILLM_MAX_TOKENS_DEFAULT (None: the context)
        self.max_prompt_bytes = max_prompt_bytes  # MILLM_MAX_PROMPT_BYTES: refused before tokenizing
        self.max_embed_tokens = max_embed_tokens  # MILLM_EMBED_MAX_TOKENS
        # A cap below the machine's free memory (MILLM_MEMORY_LIMIT_BYTES): SAEs that do not fit are refused.
        self.memory_limit_bytes = memory_limit_bytes
        self.loaded: LoadedModel | None = None
        self.model_name: str | None = None
        self.scheduler: GenerationScheduler | None = None
        self.hook = SaeHook()
        # Steering spread over layers (SteeringSpec.layers) and what it and direction="concept" need.
        self.layer_hook = LayerSteeringHook()
        self.layer_norms: list[float] | None = None
        self.concept_directions: torch.Tensor | None = None
        self.sae_name: str | None = None
        self.active_steering: CompiledSteering | None = None
        self.active_conditions: CompiledConditions | None = None  # the active steering's `when`/`abort_when`
        self.active_label = "none"
        self.monitoring = MonitoringSettings()
        self.throughput = ThroughputSampler(self._throughput_reading)  # runs while a model is loaded
        self._lock = threading.RLock()  # load/unload/attach never interleave

    # --- model -------------------------------------------------------------------------------

    def load(self, *, name: str, path: str, dtype: str = "float32", quantization: str | None = None,
             gguf_file: str | None = None) -> LoadedModel:
        with self._lock:
            # What can be refused without reading weights is refused while the old model still serves.
            check_loadable(path, dtype=dtype, quantization=quantization, gguf_file=gguf_file or None)
            self.unload()
            loaded = load_model(path, dtype=dtype, quantization=quantization, gguf_file=gguf_file or None)
            self.loaded, self.model_name = loaded, name
            self.scheduler = GenerationScheduler(loaded, max_batch_size=self.max_batch_size,
                                                 interceptors=[self.hook, self.layer_hook],
                                                 max_tokens_default=self.max_tokens_default,
                                                 max_embed_tokens=self.max_embed_tokens).start()
            self.throughput.start()
            return loaded

    def unload(self) -> None:
        with self._lock:
            self.throughput.stop()
            if self.scheduler is not None:
                self.scheduler.stop(drain_timeout_s=0.0)
                self.scheduler = None
            self.hook.detach()
            self.layer_hook.detach()
            self.sae_name, self.active_steering, self.active_label = None, None, "none"
            self.active_conditions = None
            if self.loaded is not None:
                self.loaded.unload()
            self.loaded, self.model_name = None, None
            gc.collect()

    def _throughput_reading(self):
        scheduler = self.scheduler
        return (self.model_name, scheduler.status()) if scheduler is not None else None

    def require_model(self, name: str | None = None) -> GenerationScheduler:
        if self.scheduler is None or self.loaded is None:
            raise ModelNotLoadedError("No model is loaded: load one with POST /api/models/{name}/load")
        if name is not None and name != self.model_name:
            raise ModelNotLoadedError(f"Model {name!r} is not loaded (loaded: {self.model_name!r})")
        return self.scheduler

    # --- SAE and steering --------------------------------------------------------------------

    def attach_sae(self, *, name: str, path: str) -> SaeWeights:
        """Attach an SAE; on a refusal (too big, incompatible) nothing stays attached and the model serves on."""
        with self._lock:
            scheduler = self.require_model()
            self._check_sae_fits(Path(path))
            try:
                sae = load_sae(path)  # slow I/O off the loop thread; validation happens in attach
            except (MemoryError, torch.OutOfMemoryError) as exc:
                raise InsufficientMemoryError(f"not enough memory to load the SAE in {Path(path).name!r}") from exc
            attached = scheduler.call(lambda: self.hook.attach(self.loaded.model, sae)).result()
            model, probe = self.loaded.model, self.loaded.tokenizer(NORM_PROBE_TEXT)["input_ids"]
            scheduler.call(lambda: self.layer_hook.attach(model)).result()
            self.layer_norms = scheduler.call(lambda: residual_norms(model, probe)).result()
            concept = Path(path) / "concept_directions.safetensors"  # written by the demo build
            self.concept_directions = (load_file(concept)["concept_directions"].to(attached.device)
                                       if concept.is_file() else None)
            self.sae_name, self.active_steering, self.active_label = name, None, "none"
            self.active_conditions = None
            monitored = [i for i in self.monitoring.features if i < attached.d_sae]
            scheduler.call(lambda: self.hook.set_monitored_features(monitored)).result()
            return attached

    def _check_sae_fits(self, path: Path) -> None:
        weights = path / "sae_weights.safetensors"
        needed = weights.stat().st_size if weights.is_file() else 0
        available = self.memory_limit_bytes
        if available is None:
            device = self.loaded.device
            available = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
                         else psutil.virtual_memory().available)
        if needed > available:
            raise InsufficientMemoryError(f"the SAE needs {needed / 2**20:.0f} MiB but only "
                                          f"{available / 2**20:.0f} MiB are free on {self.loaded.device}")

    def detach_sae(self) -> None:
        with self._lock:
            if self.scheduler is not None:
                self.scheduler.call(self.hook.detach).result()
                self.scheduler.call(self.layer_hook.detach).result()
            else:
                self.hook.detach()
                self.layer_hook.detach()
            self.layer_norms = self.concept_directions = None
            self.sae_name, self.active_steering, self.active_label = None, None, "none"
            self.active_conditions = None

    def compile(self, spec: SteeringSpec) -> CompiledSteering | None:
        if not spec.features:
            return None
        if not self.hook.attached:
            raise SaeNotAttachedError("No SAE is attached: attach one before steering its features")
        return compile_steering(self.hook.sae, spec, layer_norms=self.layer_norms,
                                concept_directions=self.concept_directions)

    def compile_conditions(self, conditions: SteeringConditions | None, mode: str = "additive") -> CompiledConditions | None:
        if not conditions:
            return None
        if not self.hook.attached:
            raise SaeNotAttachedError("No SAE is attached: a condition reads an SAE feature, attach one first")
        return compile_conditions(self.hook.sae, conditions, mode=mode)

    def set_active_steering(self, spec: SteeringSpec, *, label: str, conditions: SteeringConditions | None = None) -> None:
        compiled_conditions = self.compile_conditions(conditions, spec.mode)  # both checked before either applies
        compiled = self.compile(spec)
        self.active_steering, self.active_conditions = compiled, compiled_conditions
        self.active_label = label if compiled is not None or compiled_conditions is not None else "none"

    def resolve_steering(self, spec: SteeringSpec | None, label: str,
                         conditions: SteeringConditions | None = None,
                         ) -> tuple[CompiledSteering | None, str, CompiledConditions | None]:
        """The request's own steering and conditions (reported as `label`), or the active ones when it brings none."""
        if spec is None and not conditions:
            return self.active_steering, self.active_label, self.active_conditions
        spec = spec or SteeringSpec(features=())
        compiled_conditions = self.compile_conditions(conditions, spec.mode)
        compiled = self.compile(spec)
        return compiled, label if compiled is not None or compiled_conditions is not None else "none", compiled_conditions

    # --- requests ----------------------------------------------------------------------------

    def submit(self, *, request_id: str, model: str | None, prompt: str | None, messages: list | None,
               params: dict[str, Any], steering: SteeringSpec | None, steering_label: str = "inline",
               monitor: bool | None = None, features: FeatureRequest | None = None,
               conditions: SteeringConditions | None = None) -> Submitted:
        """Queue a generation; `steering` None runs the active steering, `monitor` None follows the
        monitoring settings, `features` asks for the request's own per-token features.
        Blocking (tokenizes): call it from a worker thread."""
        scheduler = self.require_model(model)
        self._check_prompt_size(prompt, messages)
        if features is not None:
            if not self.hook.attached:
                raise SaeNotAttachedError("return_features: no SAE is attached, so there are no features to return")
            validate_feature_request(features, d_sae=self.hook.sae.d_sae)
        compiled, label, compiled_conditions = self.resolve_steering(steering, steering_label, conditions)
        sampling = SamplingParams(**{k: v for k, v in params.items() if v is not None})
        tokenizer = self.loaded.tokenizer
        if messages is not None:
            chat = build_chat_prompt(tokenizer, messages)
            prompt_ids, prompt_text, prompt_param = list(chat.token_ids), chat.text, "messages"
        else:
            if not prompt:
                raise InvalidRequestError(param="prompt", message="prompt is required")
            # Tokenized here, the way the scheduler would, so monitoring frames know every prompt token.
            prompt_ids, prompt_text, prompt_param = list(tokenizer(prompt)["input_ids"]), prompt, "prompt"
        monitored = (self.monitoring.enabled if monitor is None else monitor) and self.hook.attached
        request = GenerationRequest(prompt=prompt_ids, params=sampling, steering=compiled, monitor=monitored,
                                    request_id=request_id, prompt_param=prompt_param, features=features,
                                    conditions=compiled_conditions)
        def decode(token_id: int) -> str:
            return tokenizer.decode([token_id])

        hook = self.hook
        frames = (FrameBuilder(prompt_ids, decode, top_k=hook.top_k, features=hook.monitored_features,
                               steered=hook.capture_after_steering) if monitored else None)
        returned = (FrameBuilder(prompt_ids, decode, top_k=features.top_k, features=features.features,
                                 steered=features.after_steering, positions=features.positions, stamp=False)
                    if features is not None else None)
        return Submitted(handle=scheduler.submit(request), steering_label=label, prompt_text=prompt_text,
                         frames=frames, features=returned)

    def _check_prompt_size(self, prompt: str | None, messages: list | None) -> None:
        """Refuse an oversized prompt before tokenizing it (megabytes take seconds to tokenize)."""
        limit = self.max_prompt_bytes
        if limit is None:
            return
        if messages is not None:
            size = sum(_text_bytes(message.get("content")) if isinstance(message, dict) else 0
                       for message in messages)
            param = "messages"
        else:
            size, param = _text_bytes(prompt), "prompt"
        if size > limit:
            raise InvalidRequestError(param=param, message=f"the prompt has {size} bytes; this server accepts at "
                                      f"most {limit} (MILLM_MAX_PROMPT_BYTES)")

    def configure_monitoring(self, *, enabled: bool | None = None, top_k: int | None = None,
                             features: list[int] | None = None) -> MonitoringSettings:
        if top_k is not None:
            if not 1 <= top_k <= 100:
                raise InvalidRequestError(param="top_k", message="top_k must be between 1 and 100")
            self.monitoring.top_k = self.hook.top_k = top_k
        if features is not None:
            if self.hook.attached:
                self.require_model().call(lambda: self.hook.set_monitored_features(list(features))).result()
            self.monitoring.features = tuple(features)
        if enabled is not None:
            self.monitoring.enabled = enabled
        return self.monitoring

    def statistics(self, *, top: int = 20, by: str = "mean") -> dict[str, Any]:
        stats = self.hook.statistics
        if stats is None:
            raise SaeNotAttachedError("No SAE is attached: no feature statistics")
        if by not in METRICS:
            raise InvalidRequestError(param="by", message=f"by must be one of {', '.join(METRICS)}")
        best = stats.top(top, by=by)
        columns = {name: stats.metric(name).index_select(0, torch.tensor(best.indices, dtype=torch.long,
                                                                            device=stats.device)).tolist()
                   for name in ("mean", "std", "min", "max", "active_ratio")}
        def finite(value: float) -> float | None:  # min/max of a never-seen feature are ±inf: not JSON
            return value if math.isfinite(value) else None

        return {"total_tokens": stats.total_tokens, "by": by,
                "top": [{"index": index, "value": finite(value), **{name: finite(columns[name][n]) for name in columns}}
                        for n, (index, value) in enumerate(zip(best.indices, best.values, strict=True))]}

    def reset_statistics(self) -> None:
        if self.hook.statistics is not None:
            self.hook.statistics.reset()

    def embed(self, *, model: str | None, texts: list[str], timeout_s: float | None = None) -> EmbeddingResult:
        """Blocking: call it from a worker thread. Runs in pieces between decode steps; dropped after timeout_s."""
        return self.require_model(model).embed(texts, timeout_s=timeout_s)

    def status(self) -> dict[str, Any]:
        scheduler = self.scheduler.status() if self.scheduler is not None else None
        return {
            "loaded_model": self.model_name,
            "attached_sae": self.sae_name,
            "steering": self.active_label,
            "queue_depth": scheduler.queued if scheduler else 0,
            "active_requests": scheduler.active if scheduler else 0,
            "tokens_per_second": round(scheduler.tokens_per_second, 2) if scheduler else 0.0,
            "requests_total": scheduler.requests_total if scheduler else 0,
            "tokens_total": scheduler.tokens_total if scheduler else 0,
            "memory_bytes": self.loaded.memory_bytes if self.loaded else 0,
            "monitoring": {"enabled": self.monitoring.enabled, "top_k": self.monitoring.top_k,
                           "features": list(self.monitoring.features), "active": self.hook.attached},
            "gpu": gpu_status(),
            "throughput_samples": self.throughput.samples(),  # newest first, for batch-size tuning
        }


def _text_bytes(content: Any) -> int:
    """UTF-8 size of a prompt or a message's content (a string or a list of text parts)."""
    if isinstance(content, str):
        return len(content.encode("utf-8", "surrogatepass"))
    if isinstance(content, list):
        return sum(_text_bytes(part.get("text")) if isinstance(part, dict) else 0 for part in content)
    return 0


def gpu_status() -> dict[str, Any] | None:
    """GPU memory for the System page; None on a CPU-only machine."""
    if not torch.cuda.is_available():
        return None
    return {"name": torch.cuda.get_device_name(0), "allocated_bytes": torch.cuda.memory_allocated(0),
            "total_bytes": torch.cuda.get_device_properties(0).total_memory}
