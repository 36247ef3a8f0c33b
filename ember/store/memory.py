"""Memory a model file needs at a given context, from the file's actual tensors (not a per-quant average).

weights  = GGUF: the sum of its tensors' bytes in their own types; safetensors: each floating tensor's elements
           × the bytes of the dtype it will be loaded in (integer/quantized tensors keep their own size)
KV cache = 2 (K, V) × layers × KV heads × head dim × context × bytes of the KV dtype
overhead = ember.bench.estimates.overhead_bytes: RUNTIME_BYTES (allocator pools, kernel workspaces, the
           framework) + fp32 activations of one 512-token prefill batch

`ember recommend` (ember.bench.estimates) uses the same KV and overhead formulas for per-quant estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ember.config import ModelConfig
from ember.errors import EmberError, ModelLoadError

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "auto": 2}
FLOAT_TYPES = {"F64", "F32", "F16", "BF16"}
CONTEXT_STEP = 256


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_bytes: int
    overhead_bytes: int
    context: int

    @property
    def total(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes


@dataclass(frozen=True)
class _Shape:
    config: ModelConfig
    weights_bytes: int


def dtype_bytes(dtype: str) -> int:
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of bfloat16, float16, float32")
    return DTYPE_BYTES[key]


def _gguf_shape(path: Path) -> _Shape:
    from ember.loader.gguf_config import config_from_gguf
    from ember.store.ggufinfo import ArrayInfo, read_gguf_summary

    summary = read_gguf_summary(path)
    metadata = {k: v for k, v in summary.metadata.items() if not isinstance(v, ArrayInfo)}
    config = config_from_gguf(metadata, {t.name: t.shape for t in summary.tensors}, {})
    return _Shape(config, summary.weights_bytes)


def _safetensors_shape(folder: Path, dtype: str) -> _Shape:
    from ember.config import config_from_hf, read_config_json
    from ember.models.registry import model_class_for
    from ember.store.info import SAFETENSORS_DTYPE_BYTES, safetensors_tensors

    raw = read_config_json(folder)
    _, arch = model_class_for(raw.get("architectures"), raw.get("model_type"))
    config = config_from_hf(raw, arch)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no .safetensors files")
    target = dtype_bytes(dtype)
    weights = 0
    for _, tensor_dtype, n in safetensors_tensors(files):
        weights += n * (target if tensor_dtype in FLOAT_TYPES else SAFETENSORS_DTYPE_BYTES.get(tensor_dtype, 1))
    return _Shape(config, weights)


def _shape(path: str | Path, dtype: str) -> _Shape:
    path = Path(path).expanduser()
    if path.is_dir():
        return _safetensors_shape(path, dtype)
    if path.is_file():
        return _gguf_shape(path)
    raise ModelLoadError(f"{path}: no such model file or folder")


def kv_bytes_per_token(config: ModelConfig, kv_dtype_bytes: int = 2) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * kv_dtype_bytes


def _overhead(config: ModelConfig) -> int:
    from ember.bench.estimates import overhead_bytes

    return overhead_bytes(config)


def estimate_memory(path: str | Path, context: int, dtype: str = "bfloat16") -> MemoryEstimate:
    """Bytes to run the model at `path` with `context` tokens of KV cache (in `dtype`)."""
    if not isinstance(context, int) or context <= 0:
        raise ModelLoadError(f"context must be a positive integer, not {context!r}")
    shape = _shape(path, dtype)
    kv = kv_bytes_per_token(shape.config, dtype_bytes(dtype)) * context
    return MemoryEstimate(shape.weights_bytes, kv, _overhead(shape.config), context)


def fit_context(path: str | Path, budget_bytes: int, wanted: int, dtype: str = "bfloat16") -> int:
    """The largest context ≤ `wanted` that fits in `budget_bytes`: `wanted` itself when it fits, else the
    largest multiple of 256 that does; EmberError when not even 256 tokens fit."""
    shape = _shape(path, dtype)
    fixed = shape.weights_bytes + _overhead(shape.config)
    per_token = kv_bytes_per_token(shape.config, dtype_bytes(dtype))
    if fixed + per_token * wanted <= budget_bytes:
        return wanted
    fits = (budget_bytes - fixed) // per_token if budget_bytes > fixed else 0
    context = min(fits, wanted) // CONTEXT_STEP * CONTEXT_STEP
    if context < CONTEXT_STEP:
        need = fixed + per_token * CONTEXT_STEP
        raise EmberError(f"{Path(path).name} needs {need / 2**30:.2f} GiB for even {CONTEXT_STEP} tokens of "
                         f"context; {budget_bytes / 2**30:.2f} GiB available")
    return context
