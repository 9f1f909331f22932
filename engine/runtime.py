"""Everything the inference process holds, behind one object: the loaded model and its scheduler,
the attached SAEs' hooks, and the active steering. No Django here; `inference/process.py` drives it.

Several SAEs may be attached at once (`attached`, in attach order), on different layers or the same one.
The first is the default: a feature without `sae` means it, requested features and the pinned monitored
features read it, and `hook`/`sae_name` name it, so single-SAE callers see what they always saw. Monitoring
frames come from every attached SAE, each naming its `sae` while several are attached.

Blocking methods (load, attach) are meant for a worker thread; model surgery runs on the
scheduler's loop thread between forward passes (`scheduler.call`), so no request sees half a change.
"""

from __future__ import annotations

import gc
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors.torch import load_file

from engine.activation_frames import FrameBuilder, MonitorFrames
from engine.chat import build_chat_prompt
from engine.control_vectors import add_spec_vectors
from engine.embeddings import EmbeddingResult
from engine.errors import InsufficientMemoryError, ModelNotLoadedError, SaeNotAttachedError
from engine.feature_stats import METRICS
from engine.generation import GenerationRequest, RequestHandle
from engine.loading import LoadedModel, check_loadable, load_model
from engine.request_features import FeatureRequest, validate_feature_request
from engine.sae import SaeWeights, load_sae
from engine.sae_hook import SaeHook, SaeHooks
from engine.sampling import InvalidRequestError, SamplingParams
from engine.scheduler import GenerationScheduler
from engine.steering import CompiledSteering, InvalidSteeringError, SteeringSpec, compile_steering
from engine.steering_conditions import CompiledConditions, SteeringConditions, compile_conditions_multi
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
    frames: FrameBuilder | MonitorFrames | None  # set when the request is monitored (MonitorFrames: several SAEs)
    features: FrameBuilder | None = None  # set when the request asks for its own features (return_features)


@dataclass(frozen=True)
class AttachedSae:
    name: str
    hook: SaeHook  # its own forward hook at its layer (captures, statistics, its part of the steering)
    sae: SaeWeights  # the copy the hook runs, on the layer's device and dtype
    concept_directions: torch.Tensor | None
    size_bytes: int  # its weights file: counted against MILLM_MEMORY_LIMIT_BYTES with the others
    # (d_sae, k) the tokens each concept direction is built from (-1: none): until_concept's stop tokens.
    concept_tokens: torch.Tensor | None = None


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
        self.saes = SaeHooks()  # the scheduler's interceptor for every attached SAE's hook
        self.attached: dict[str, AttachedSae] = {}  # attach order: the first is the default SAE
        self._idle_hook = SaeHook()  # what `hook` is while no SAE is attached
        # Steering spread over layers (SteeringSpec.layers) and what it and direction="concept" need.
        self.layer_hook = LayerSteeringHook()
        self.layer_norms: list[float] | None = None
        self.active_steering: CompiledSteering | None = None
        self.active_conditions: CompiledConditions | None = None  # the active steering's `when`/`abort_when`
        self.active_label = "none"
        self.monitoring = MonitoringSettings()
        self.throughput = ThroughputSampler(self._throughput_reading)  # runs while a model is loaded
        self._lock = threading.RLock()  # load/unload/attach never interleave

    @property
    def hook(self) -> SaeHook:
        """The default (first attached) SAE's hook; an unattached one while none is."""
        default = next(iter(self.attached.values()), None)
        return default.hook if default is not None else self._idle_hook

    @property
    def sae_name(self) -> str | None:
        return next(iter(self.attached), None)

    @property
    def concept_directions(self) -> torch.Tensor | None:
        default = next(iter(self.attached.values()), None)
        return default.concept_directions if default is not None else None

    def attached_hook(self, sae: str | None) -> SaeHook:
        """The hook of the named attached SAE (None: the default); SaeNotAttachedError otherwise."""
        if sae is None:
            if not self.attached:
                raise SaeNotAttachedError("No SAE is attached")
            return self.hook
        if sae not in self.attached:
            raise SaeNotAttachedError(f"SAE {sae!r} is not attached (attached: {', '.join(self.attached) or 'none'})",
                                      param="sae")
        return self.attached[sae].hook

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
                                                 interceptors=[self.saes, self.layer_hook],
                                                 max_tokens_default=self.max_tokens_default,
                                                 max_embed_tokens=self.max_embed_tokens).start()
            # Attached from the start: steering vectors add at any layer with no SAE attached.
            self.scheduler.call(lambda: self.layer_hook.attach(loaded.model)).result()
            self.throughput.start()
            return loaded

    def unload(self) -> None:
        with self._lock:
            self.throughput.stop()
            if self.scheduler is not None:
                self.scheduler.stop(drain_timeout_s=0.0)
                self.scheduler = None
            for attached in self.attached.values():
                attached.hook.detach()
            self.attached, self.saes.hooks, self.layer_norms = {}, (), None
            self.layer_hook.detach()
            self.active_steering, self.active_label = None, "none"
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
        """Attach an SAE beside those attached (one of the same name is replaced); on a refusal (too big,
        incompatible) it is not attached, the others stay as they were and the model serves on."""
        with self._lock:
            scheduler = self.require_model()
            size = self._check_sae_fits(Path(path), replacing=name)
            try:
                sae = load_sae(path)  # slow I/O off the loop thread; validation happens in attach
            except (MemoryError, torch.OutOfMemoryError) as exc:
                raise InsufficientMemoryError(f"not enough memory to load the SAE in {Path(path).name!r}") from exc
            hook = SaeHook(top_k=self.monitoring.top_k, board=self.saes.board)
            model = self.loaded.model
            # Hooked but not yet among `saes.hooks`: it sees no context, so it does nothing until swapped in.
            on_device = scheduler.call(lambda: hook.attach(model, sae)).result()
            try:
                concept = Path(path) / "concept_directions.safetensors"  # written by the demo build
                concept_file = load_file(concept) if concept.is_file() else {}
                directions = (concept_file["concept_directions"].to(on_device.device) if concept_file else None)
                concept_tokens = concept_file.get("token_ids")  # until_concept's stop tokens (CPU)
                if self.layer_norms is None:
                    probe = self.loaded.tokenizer(NORM_PROBE_TEXT)["input_ids"]
                    if not self.layer_hook.attached:
                        scheduler.call(lambda: self.layer_hook.attach(model)).result()
                    self.layer_norms = scheduler.call(lambda: residual_norms(model, probe)).result()
            except BaseException:
                scheduler.call(hook.detach).result()  # nothing half-attached
                raise
            replaced = self.attached.get(name)
            if replaced is not None or not self.attached:
                # The active steering was compiled against the SAE replaced (or against none).
                self.active_steering, self.active_conditions, self.active_label = None, None, "none"
            entry = AttachedSae(name=name, hook=hook, sae=on_device, concept_directions=directions, size_bytes=size,
                                concept_tokens=concept_tokens)
            # A replaced SAE keeps its place (the default stays the default); a new one goes last.
            attached = {n: entry if n == name else a for n, a in self.attached.items()}
            attached.setdefault(name, entry)
            scheduler.call(lambda: self._install(attached, removed=replaced)).result()
            return on_device

    def _install(self, attached: dict[str, AttachedSae], *, removed: AttachedSae | None) -> None:
        """On the loop thread, between passes: the new set of hooks, the first one the default's."""
        if removed is not None:
            removed.hook.detach()
        for n, entry in enumerate(attached.values()):
            part = None if n == 0 else entry.name
            if entry.hook.part != part or n == 0:
                entry.hook.set_part(part)
                monitored = [i for i in self.monitoring.features if i < entry.sae.d_sae] if part is None else []
                entry.hook.set_monitored_features(monitored)
        self.attached = attached
        self.saes.hooks = tuple(entry.hook for entry in attached.values())

    def _check_sae_fits(self, path: Path, *, replacing: str | None = None) -> int:
        weights = path / "sae_weights.safetensors"
        needed = weights.stat().st_size if weights.is_file() else 0
        available = self.memory_limit_bytes
        if available is not None:  # a cap for everything attached: the others count against it
            available -= sum(a.size_bytes for n, a in self.attached.items() if n != replacing)
        else:
            device = self.loaded.device
            available = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
                         else psutil.virtual_memory().available)
        if needed > available:
            others = f" beside the {len(self.attached)} attached" if self.attached else ""
            raise InsufficientMemoryError(f"the SAE needs {needed / 2**20:.0f} MiB but only "
                                          f"{max(available, 0) / 2**20:.0f} MiB are free on {self.loaded.device}{others}")
        return needed

    def detach_sae(self, name: str | None = None) -> None:
        """Detach one SAE by name (the others stay; the next becomes the default), or every SAE (None)."""
        with self._lock:
            names = list(self.attached) if name is None else [name] if name in self.attached else []
            if not names:
                return
            attached = {n: a for n, a in self.attached.items() if n not in names}
            default_changed = next(iter(attached), None) != self.sae_name

            def install() -> None:
                for n in names:
                    self.attached[n].hook.detach()
                self._install(attached, removed=None)

            if self.scheduler is not None:
                self.scheduler.call(install).result()
            else:
                install()
            # The layer hook stays: steering vectors need no SAE.
            if not attached:
                self.layer_norms = None
            if default_changed or not attached or self._active_uses(names):
                self.active_steering, self.active_label = None, "none"
                self.active_conditions = None

    def _active_uses(self, names: list[str]) -> bool:
        steering, conditions = self.active_steering, self.active_conditions
        return any(n in (steering.saes or {}) if steering is not None else False for n in names) or any(
            n in (conditions.saes or {}) if conditions is not None else False for n in names)

    def compile(self, spec: SteeringSpec) -> CompiledSteering | None:
        if spec.until_concept and not spec.features:
            raise InvalidSteeringError("until_concept needs SAE features steered without a condition: their concept "
                                       "tokens end it (a conditional feature's `when` already decides where it applies)")
        if not spec.features:  # raw vectors (engine/control_vectors.py) need no SAE
            return add_spec_vectors(None, spec, self.loaded.model) if self.loaded is not None else None
        if not self.attached:
            raise SaeNotAttachedError("No SAE is attached: attach one before steering its features")
        return add_spec_vectors(self._compile_features(spec), spec, self.loaded.model)

    def _compile_features(self, spec: SteeringSpec) -> CompiledSteering:
        """The default SAE's features at its layer; each other SAE's as `saes[name]`, applied by its hook.

        With `layers`, every SAE's features are spread the same way, each relative to its own SAE's layer L_S
        (`(n_l / n_{L_S}) · Σ s_i d_i`): the part at L_S stays with that SAE (its hook adds it), and every SAE's
        other layers are summed into the row's `other_layers`, which the layer hook adds."""
        default = self.sae_name
        groups: dict[str, list] = {default: []}
        for feature in spec.features:
            name = default if feature.sae is None else feature.sae
            if name not in self.attached:
                raise SaeNotAttachedError(f"feature {feature.index}: SAE {name!r} is not attached "
                                          f"(attached: {', '.join(self.attached)})", param="sae")
            groups.setdefault(name, []).append(feature)
        own = self.attached[default]
        unembedding = self._unembedding() if spec.until_concept else None  # for an SAE without concept tokens
        if groups[default] or len(groups) == 1:
            top = self._compile_part(default, replace(spec, features=tuple(groups[default])), unembedding)
        else:  # only other SAEs' features: nothing at the default SAE's layer but a zero delta
            top = compile_steering(own.sae, SteeringSpec(features=(), positions=spec.positions,
                                                         max_steered_tokens=spec.max_steered_tokens,
                                                         until_concept=spec.until_concept))
        parts = {}
        spread = dict(top.other_layers or {})
        for name, features in groups.items():
            if name != default:
                part = self._compile_part(name, replace(spec, features=tuple(features)), unembedding)
                for layer, other in (part.other_layers or {}).items():
                    spread[layer] = other if layer not in spread else _summed(spread[layer], other)
                parts[name] = replace(part, other_layers=None)  # its hook adds its own layer's part only
        if parts:  # one row, one latch: any SAE's concept token ends all of its steering
            top = replace(top, saes=parts, other_layers=spread or None, stop_token_ids=top.stop_token_ids.union(
                *(p.stop_token_ids for p in parts.values())))
        if spec.until_concept and not top.stop_token_ids:
            raise InvalidSteeringError("until_concept: none of the steered features has a concept token to stop at")
        return top

    def _compile_part(self, name: str, spec: SteeringSpec, unembedding: torch.Tensor | None) -> CompiledSteering:
        """One attached SAE's features (a refusal names the SAE while several are attached)."""
        sae = self.attached[name]
        try:
            return compile_steering(sae.sae, spec, layer_norms=self.layer_norms,
                                    concept_directions=sae.concept_directions, concept_tokens=sae.concept_tokens,
                                    unembedding=unembedding)
        except InvalidSteeringError as exc:
            if len(self.attached) == 1:
                raise
            raise type(exc)(f"SAE {name}: {exc.message}", code=exc.code, param=exc.param) from exc

    def _unembedding(self) -> torch.Tensor:
        """W_U (vocab, d): the output head's weight, or the (tied) input embeddings when the head is quantized."""
        model = self.loaded.model
        weight = getattr(model.get_output_embeddings(), "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            weight = model.get_input_embeddings().weight
        return weight.detach()

    def compile_conditions(self, conditions: SteeringConditions | None, mode: str = "additive", *,
                           layers: Sequence[int] = (), direction: str = "decoder") -> CompiledConditions | None:
        """A conditional feature is steered at its own SAE's layer, along its decoder row or (`direction`
        "concept") its concept direction; a layer spread cannot carry its condition, so `layers` is refused."""
        if not conditions:
            return None
        if not self.attached:
            raise SaeNotAttachedError("No SAE is attached: a condition reads an SAE feature, attach one first")
        if conditions.features and layers:
            raise InvalidSteeringError("conditional features (`when`) are steered at their own SAE's layer: `layers` "
                                       "(which the preset sets) cannot spread them; leave out `layers` and `preset`, "
                                       "or steer the feature without `when`")
        directions = ({n: a.concept_directions for n, a in self.attached.items()} if direction == "concept" else None)
        return compile_conditions_multi({n: a.sae for n, a in self.attached.items()}, self.sae_name, conditions,
                                        mode=mode, concept_directions=directions)

    def set_active_steering(self, spec: SteeringSpec, *, label: str, conditions: SteeringConditions | None = None) -> None:
        compiled_conditions = self.compile_conditions(conditions, spec.mode, layers=spec.layers,
                                                      direction=spec.direction)  # both checked before either applies
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
        compiled_conditions = self.compile_conditions(conditions, spec.mode, layers=spec.layers, direction=spec.direction)
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
            if features.sae == self.sae_name:
                features = replace(features, sae=None)  # the default SAE, by name: its own hook reads it
            if features.sae is not None and features.sae not in self.attached:
                raise SaeNotAttachedError(f"return_features.sae: SAE {features.sae} is not attached "
                                          f"(attached: {', '.join(self.attached)})", param="return_features.sae")
            validate_feature_request(features, d_sae=self.attached_hook(features.sae).sae.d_sae)
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

        frames = self._monitor_frames(prompt_ids, decode) if monitored else None
        returned = (FrameBuilder(prompt_ids, decode, top_k=features.top_k, features=features.features,
                                 steered=features.after_steering, positions=features.positions, stamp=False,
                                 reads=features.sae)
                    if features is not None else None)
        return Submitted(handle=scheduler.submit(request), steering_label=label, prompt_text=prompt_text,
                         frames=frames, features=returned)

    def _monitor_frames(self, prompt_ids: list[int], decode: Callable[[int], str]) -> FrameBuilder | MonitorFrames:
        """The live monitor's frames: the default SAE's (its pinned features too), and with several SAEs
        attached each other SAE's top-k as well, every frame naming its SAE."""
        hook = self.hook
        if len(self.attached) <= 1:
            return FrameBuilder(prompt_ids, decode, top_k=hook.top_k, features=hook.monitored_features,
                                steered=hook.capture_after_steering)
        builders = [
            FrameBuilder(prompt_ids, decode, top_k=entry.hook.top_k,
                         features=entry.hook.monitored_features if n == 0 else (),
                         steered=entry.hook.capture_after_steering, sae=name, reads=None if n == 0 else name)
            for n, (name, entry) in enumerate(self.attached.items())
        ]
        return MonitorFrames(builders)

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
            self.monitoring.top_k = self._idle_hook.top_k = top_k
            for attached in self.attached.values():
                attached.hook.top_k = top_k
        if features is not None:
            if self.hook.attached:
                self.require_model().call(lambda: self.hook.set_monitored_features(list(features))).result()
            self.monitoring.features = tuple(features)
        if enabled is not None:
            self.monitoring.enabled = enabled
        return self.monitoring

    def statistics(self, *, top: int = 20, by: str = "mean", sae: str | None = None) -> dict[str, Any]:
        """The running statistics of one attached SAE (None: the default)."""
        stats = self.attached_hook(sae).statistics if self.attached or sae is not None else None
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

        return {"total_tokens": stats.total_tokens, "by": by, "sae": sae or self.sae_name,
                "top": [{"index": index, "value": finite(value), **{name: finite(columns[name][n]) for name in columns}}
                        for n, (index, value) in enumerate(zip(best.indices, best.values, strict=True))]}

    def reset_statistics(self, sae: str | None = None) -> None:
        """Reset one attached SAE's statistics, or every SAE's (None)."""
        for name, attached in self.attached.items():
            if attached.hook.statistics is not None and sae in (None, name):
                attached.hook.statistics.reset()

    def embed(self, *, model: str | None, texts: list[str], timeout_s: float | None = None) -> EmbeddingResult:
        """Blocking: call it from a worker thread. Runs in pieces between decode steps; dropped after timeout_s."""
        return self.require_model(model).embed(texts, timeout_s=timeout_s)

    def status(self) -> dict[str, Any]:
        scheduler = self.scheduler.status() if self.scheduler is not None else None
        return {
            "loaded_model": self.model_name,
            "attached_sae": self.sae_name,  # the default SAE, as when only one could be attached
            "attached_saes": [{"name": a.name, "layer": a.sae.hook_layer, "d_sae": a.sae.d_sae}
                              for a in self.attached.values()],
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


def _summed(a: CompiledSteering, b: CompiledSteering) -> CompiledSteering:
    """Two SAEs' additive steering at one spread layer, as one (summed in float32, as compile_steering sums)."""
    total = (a.additive_delta.float() + b.additive_delta.float().to(a.additive_delta.device)).to(a.additive_delta.dtype)
    return replace(a, feature_indices=torch.cat([a.feature_indices, b.feature_indices.to(a.feature_indices.device)]),
                   additive_delta=total)


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
