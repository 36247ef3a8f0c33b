"""Memory a model file needs at a given context, from the file's actual tensors (not a per-quant average).

weights  = what ember holds after loading the file (ember.loader.gguf_model, ember.quant.linear):
           GGUF matrices by backend: Q4_0/Q4_1/Q4_K → int4-packed (0.5 byte a weight) + a (scale, zero) pair in
           the activation dtype per 32; Q5_0/Q5_1/Q5_K/Q6_K/Q8_0 → int8 (1 byte a weight) + a float32 scale
           (and offset, for Q5_1/Q5_K) per group of 32 (16 for Q6_K); other types (Q2_K, Q3_K, IQ4_*) → the
           file's bytes; the token embedding → the file's bytes (QuantEmbedding keeps the blocks), plus its
           repacked copy as the output layer when the file ties them; vectors and float matrices → the
           activation dtype. Safetensors: each floating tensor's elements × the bytes of the dtype it will be
           loaded in (integer/quantized tensors keep their own size)
KV cache = 2 (K, V) × layers × KV heads × head dim × context × bytes of the KV dtype
overhead = ember.bench.estimates.overhead_bytes: RUNTIME_BYTES (allocator pools, kernel workspaces, the
           framework) + fp32 activations of one 512-token prefill batch + the tokenizer (~272 bytes a vocabulary
           entry)

`ember recommend` (ember.bench.estimates) takes a real model's figures from here, and the same KV and overhead
formulas for its per-quantization estimates. Reading a GGUF here never imports torch.
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


# ember.quant.linear's backends by GGML type name (kept as names so this module needs no torch).
INT4_TYPES = {"Q4_0", "Q4_1", "Q4_K"}
INT8_GROUPS = {"Q5_0": 32, "Q5_1": 32, "Q5_K": 32, "Q6_K": 16, "Q8_0": 32}  # values per float32 scale
INT8_OFFSETS = {"Q5_1", "Q5_K"}  # types that also keep a float32 offset per group
INT4_GROUP = 32
EMBEDDING = "token_embd.weight"


def quant_linear_bytes(type_name: str, out_features: int, in_features: int, file_bytes: int, act_bytes: int) -> int:
    """Bytes a QuantLinear holds for a [out, in] matrix of `type_name` (see ember.quant.linear)."""
    n = out_features * in_features
    if type_name in INT4_TYPES and in_features % INT4_GROUP == 0 and out_features % 16 == 0:
        return n // 2 + n // INT4_GROUP * 2 * act_bytes  # packed nibbles + (scale, zero) in the activation dtype
    if type_name in INT8_GROUPS:
        groups = n // INT8_GROUPS[type_name]
        return n + groups * 4 * (2 if type_name in INT8_OFFSETS else 1)
    return file_bytes  # "blocks": the file's blocks as they are


def gguf_held_bytes(tensors, act_bytes: int) -> int:
    """What ember holds for a GGUF's tensors (TensorInfo of ember.loader.gguf) with activations of `act_bytes`."""
    tensors = list(tensors)
    names = {t.name for t in tensors}
    total = 0
    for t in tensors:
        quantized = t.type_name not in FLOAT_TYPES
        if len(t.shape) == 1 or not quantized:
            total += t.n_elements * act_bytes  # vectors and float matrices: plain weights in the activation dtype
            continue
        if t.name == EMBEDDING:
            total += t.nbytes  # QuantEmbedding keeps the blocks
            if "output.weight" not in names:  # tied: the same rows again as a QuantLinear output layer
                total += quant_linear_bytes(t.type_name, t.shape[0], t.shape[-1], t.nbytes, act_bytes)
            continue
        total += quant_linear_bytes(t.type_name, t.shape[0], t.n_elements // t.shape[0], t.nbytes, act_bytes)
    return total


def _gguf_shape(path: Path, dtype: str) -> _Shape:
    from ember.loader.gguf import ArrayInfo, read_header
    from ember.loader.gguf_config import config_from_gguf

    summary = read_header(path)
    metadata = {k: v for k, v in summary.metadata.items() if not isinstance(v, ArrayInfo)}
    config = config_from_gguf(metadata, {t.name: t.shape for t in summary.tensors.values()}, {})
    return _Shape(config, gguf_held_bytes(summary.tensors.values(), dtype_bytes(dtype)))


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
        return _gguf_shape(path, dtype)
    raise ModelLoadError(f"{path}: no such model file or folder")


def model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a GGUF file or checkpoint folder, from headers only."""
    return _shape(path, "bfloat16").config


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
