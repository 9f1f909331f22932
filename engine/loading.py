"""Loading a causal LM and its tokenizer from a local folder (or GGUF file) for serving.

Q4/Q8 use bitsandbytes on CUDA; on CPU (where bitsandbytes is slower than float32) int4 weight-only
and int8 W8A8 with per-token activation scales (engine/quantization.py) on miLLM's AVX-512 kernels, or
torch's where those cannot run. A model on miLLM's kernels also takes its one-token decode attention
from miLLM's kernel, and its norms and rotary (engine/decode_kernels.py); float32 keeps
transformers' own, bit for bit.

Every failure a user can cause (a missing folder, quantizing a GGUF file, an unknown dtype, a
machine without a bitsandbytes backend) is a ModelLoadError subclass with a message that says what
to do instead; the original exception stays chained for the log.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import quantization as cpu_quantization
from engine.errors import (  # noqa: F401 - re-exported: the loading errors belong with the loader
    InsufficientMemoryError,
    InvalidModelError,
    ModelLoadError,
    ModelNotFoundError,
    QuantizationUnavailableError,
    UnsupportedConfigurationError,
    UnsupportedModelError,
)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
QUANTIZATIONS = ("q4", "q8")
_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
DEFAULT_CONTEXT_LENGTH = 2048
# bitsandbytes storage per quantized weight element: int8 + one fp32 scale per output row (q8);
# packed nf4 + one fp32 absmax per 64-element block (q4, no double quantization).
_Q8_BYTES, _Q4_BYTES, _Q4_BLOCK = 1.0, 0.5, 64
# torch's CPU kernels: packed int4 + bf16 (scale, zero) per 32 columns; int8 + one bf16 scale per row.
_CPU_Q4_BYTES = 0.5 + 4 / cpu_quantization.GROUP_SIZE


@dataclass(eq=False)
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode; None after unload()
    tokenizer: Any
    source: str
    gguf_file: str | None
    dtype: str
    quantization: str | None
    device: torch.device
    hidden_size: int
    num_layers: int
    context_length: int
    vocab_size: int
    parameter_count: int
    memory_bytes: int  # what the loaded weights take
    estimated_memory_bytes: int  # what estimate_memory_bytes predicted
    eos_token_ids: frozenset[int]
    load_seconds: float
    kernel: str = "dense"  # which matmuls serve it: "dense", "bitsandbytes", or a torch CPU kernel

    @property
    def variant(self) -> str:
        """What is served, in words, e.g. "float32, Q4 (torch int4 CPU kernel, ...), cpu"."""
        quantized = f"{self.quantization.upper()} ({self.kernel})" if self.quantization else "not quantized"
        return f"{self.dtype}, {quantized}, {self.device.type}"

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def unload(self) -> None:
        """Drop the weights. Whoever else holds the model (a scheduler) must let go first."""
        self.model = None
        self.tokenizer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def load_model(
    path_or_folder: str | Path,
    *,
    dtype: str = "float32",
    quantization: str | None = None,
    gguf_file: str | None = None,
    device: str | None = None,
) -> LoadedModel:
    """Load a local HF folder (or a .gguf file, or a folder plus gguf_file) for inference."""
    started = time.perf_counter()
    folder, gguf_file, quantization, target = check_loadable(
        path_or_folder, dtype=dtype, quantization=quantization, gguf_file=gguf_file, device=device)
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[dtype],
        "device_map": {"": str(target)},
        "local_files_only": True,
    }
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    on_cpu = target.type == "cpu"
    if quantization is not None and not on_cpu:
        kwargs["quantization_config"] = _quantization_config(quantization, DTYPES[dtype])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = _call(
        "tokenizer",
        folder,
        lambda: AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file, local_files_only=True),
    )
    model = _call(
        "model", folder, lambda: AutoModelForCausalLM.from_pretrained(str(folder), **kwargs), quantization
    )
    model.eval().requires_grad_(False)
    kernel = "dense"
    if quantization is not None:
        kernel = "bitsandbytes"
        if on_cpu:
            cpu_quantization.quantize_for_cpu(model, quantization)
            kernel = cpu_quantization.kernel_name(quantization)
            gc.collect()  # the float weights of the replaced layers
            if cpu_quantization.uses_own_kernel(quantization):
                from engine import decode_kernels  # transformers, only once a model is loaded

                if decode_kernels.use_cpu_kernels(model):
                    kernel = f"{kernel}; {decode_kernels.LABEL}"
    config = model.config.get_text_config()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=str(folder),
        gguf_file=gguf_file,
        dtype=dtype,
        quantization=quantization,
        device=target,
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        context_length=context_length_of(config, tokenizer),
        vocab_size=int(config.vocab_size),
        parameter_count=parameter_count_of(model.config),
        memory_bytes=int(model.get_memory_footprint()),
        estimated_memory_bytes=estimate_memory_bytes(model.config, dtype, quantization, on_cpu=on_cpu),
        eos_token_ids=_eos_token_ids(model, tokenizer),
        load_seconds=round(time.perf_counter() - started, 3),
        kernel=kernel,
    )


def check_loadable(path_or_folder: str | Path, *, dtype: str = "float32", quantization: str | None = None,
                   gguf_file: str | None = None, device: str | None = None,
                   ) -> tuple[Path, str | None, str | None, torch.device]:
    """Every refusal that needs no weights read: called before the serving model is unloaded, so a load
    that cannot work leaves it serving. Returns (folder, gguf file, quantization, device) as load_model
    uses them."""
    folder = Path(path_or_folder)
    if folder.suffix == ".gguf" and gguf_file is None:
        folder, gguf_file = folder.parent, folder.name
    if dtype not in DTYPES:
        raise UnsupportedConfigurationError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantization is not None:
        quantization = quantization.lower()
        if quantization not in QUANTIZATIONS:
            raise UnsupportedConfigurationError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)} or none, got {quantization!r}"
            )
        if gguf_file is not None:
            raise UnsupportedConfigurationError(
                "a GGUF file is dequantized when it loads and cannot be re-quantized with Q4/Q8; "
                "load it as float32/float16/bfloat16, or quantize a safetensors checkpoint"
            )
    _check_source(folder, gguf_file)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if quantization is not None:
        if target.type == "cpu":
            _check_cpu_kernel(quantization)
        else:
            _quantization_config(quantization, DTYPES[dtype])  # bitsandbytes importable here
    return folder, gguf_file, quantization, target


def _check_cpu_kernel(quantization: str) -> None:
    """Run the CPU kernel once on a 16 x 32 layer: a torch build or CPU without it fails here, in
    milliseconds, not after the serving model is gone."""
    try:
        layer = cpu_quantization.QuantizedLinear(torch.nn.Linear(cpu_quantization.GROUP_SIZE, 16), quantization)
        with torch.no_grad():
            layer(torch.zeros(1, cpu_quantization.GROUP_SIZE))
    except Exception as exc:
        raise QuantizationUnavailableError(
            f"{quantization.upper()} is not available on this CPU ({type(exc).__name__}); "
            "load float32/bfloat16 instead"
        ) from None


def _check_source(path: Path, gguf_file: str | None) -> None:
    if not path.is_dir():
        raise ModelNotFoundError(f"model folder {path.name!r} does not exist; download the model first")
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise ModelNotFoundError(f"GGUF file {gguf_file!r} is not in the model folder")
    elif not (path / "config.json").is_file():
        raise InvalidModelError(f"{path.name!r} holds no config.json: not a transformers model folder")


def _quantization_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401  (imported lazily: it takes seconds)
    except Exception as exc:
        raise QuantizationUnavailableError(
            "Q4/Q8 need the bitsandbytes package, which is not usable here; load float16/bfloat16/float32"
        ) from exc
    from transformers import BitsAndBytesConfig

    if quantization == "q8":
        # On CPU, 8-bit matmuls log a cast warning on every call: it says nothing new after the first.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_cast_warning)
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )


def _drop_cast_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _call(what: str, folder: Path, load: Any, quantization: str | None = None) -> Any:
    try:
        return load()
    except ModelLoadError:
        raise
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise InsufficientMemoryError(
            f"{folder.name!r} does not fit in memory; try Q4/Q8 or float16/bfloat16"
        ) from exc
    except Exception as exc:
        if quantization is not None and _mentions_bitsandbytes(exc):
            raise QuantizationUnavailableError(
                f"{quantization.upper()} is not available on this device ({type(exc).__name__}); "
                "load float16/bfloat16/float32 instead"
            ) from exc
        raise InvalidModelError(
            f"could not load the {what} from {folder.name!r} ({type(exc).__name__})"
        ) from exc


def _mentions_bitsandbytes(exc: BaseException) -> bool:
    text = f"{type(exc).__module__} {exc}".lower()
    return "bitsandbytes" in text or "bnb" in text or "quantiz" in text


def context_length_of(config: Any, tokenizer: Any = None) -> int:
    for name in _CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (1e30): not a context length.
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else DEFAULT_CONTEXT_LENGTH


def _eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(i) for i in configured)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _meta_model(config: Any) -> torch.nn.Module:
    """The model's modules without memory: exact shapes for counting, in milliseconds."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_count_of(config: Any) -> int:
    """Parameters of the unquantized model (tied weights counted once)."""
    return sum(p.numel() for p in _meta_model(config).parameters())


def estimate_memory_bytes(config: Any, dtype: str, quantization: str | None, *, on_cpu: bool = False) -> int:
    """Bytes the weights will take once loaded (activations and KV cache not included).

    With Q4/Q8, bitsandbytes (CUDA) quantizes the Linear layers except the output head; torch's CPU
    kernels quantize the head too (a tied head keeps the embedding's float weight besides); embeddings,
    norms and biases stay in `dtype`.
    """
    if dtype not in DTYPES:
        raise UnsupportedConfigurationError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    element = torch.empty((), dtype=DTYPES[dtype]).element_size()
    model = _meta_model(config)
    head = model.get_output_embeddings()
    tied = model.get_input_embeddings().weight if head is not None and head.weight is model.get_input_embeddings().weight else None
    quantized: set[int] = set()
    total = 0.0
    if quantization is not None:
        for module in model.modules():
            if on_cpu and cpu_quantization.quantizable(module):
                n, k = cpu_quantization.weight_shape(module)
                if quantization == "q4":
                    total += n * k * _CPU_Q4_BYTES
                else:  # int8 weights and bf16 scales
                    total += n * k + 2 * n
                if module.weight is not tied:  # a tied head's weight stays alive as the embedding
                    quantized.add(id(module.weight))
            elif not on_cpu and isinstance(module, torch.nn.Linear) and module is not head:
                quantized.add(id(module.weight))
    seen: set[int] = set()
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        n = parameter.numel()
        if id(parameter) not in quantized:
            total += n * element
        elif on_cpu:
            continue  # counted above, per layer
        elif quantization == "q8":
            total += n * _Q8_BYTES + parameter.shape[0] * 4
        else:
            total += n * _Q4_BYTES + n / _Q4_BLOCK * 4
    return int(total)


def kv_cache_bytes_per_token(config: Any, dtype: str) -> int:
    """KV cache bytes one token costs across all layers (for capacity planning)."""
    text = config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = torch.empty((), dtype=DTYPES.get(dtype, torch.float32)).element_size()
    return 2 * text.num_hidden_layers * heads * head_dim * element
