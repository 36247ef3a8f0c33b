"""Memory of a model at one quantization and context: the figures `ember recommend` places on a machine.

weights  = parameters × effective bits per weight ÷ 8; for a real model's own quantization,
           ember.store.memory.estimate_memory's figure (what ember holds after loading that file on the device
           it would run on: the file's bytes with the native CPU kernels, int4/int8 repacks on a GPU)
KV cache = 2 (K, V) × layers × KV heads × head dim × context × 2 bytes (an f16 cache, one sequence, as
           llama.cpp and GPUs keep it; with --kv-cache-dtype int8, 1 byte a value + a 4-byte scale per head), the formula of ember.store.memory.kv_bytes_per_token (ember's own
           "auto" cache on CPU is float32: estimate_memory(..., "auto", "cpu") counts 4 bytes)
overhead = runtime + activations of one 512-token prefill batch (fp32) + the tokenizer (per vocabulary entry),
           which estimate_memory also adds
"""

from __future__ import annotations

import re
from pathlib import Path

from ember.bench.advice import Option
from ember.bench.shapes import parameter_count
from ember.config import ModelConfig
from ember.store.memory import kv_bytes_per_token, overhead_bytes

# Averages over whole GGUF files as llama-quantize writes them (mixes keep some tensors at higher
# precision): e.g. Llama-3.3-70B Q4_K_M is 42.5 GB for 70.6 B parameters = 4.82 bits.
BITS_PER_WEIGHT = {"F16": 16.0, "BF16": 16.0, "F32": 32.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K_M": 5.69,
                   "Q4_K_M": 4.85, "Q3_K_M": 3.91, "Q2_K": 2.99}
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # as GGUF names them
KV_BYTES_PER_ELEMENT = 2


def kv_cache_bytes(config: ModelConfig, context: int, kv_cache_dtype: str = "auto") -> int:
    """A 16-bit cache ("auto"), or a quantized one (--kv-cache-dtype int8: values and per-head scales)."""
    return kv_bytes_per_token(config, KV_BYTES_PER_ELEMENT, kv_cache_dtype) * context


def weights_bytes(config: ModelConfig, quant: str) -> int:
    return int(parameter_count(config) * BITS_PER_WEIGHT[quant] / 8)


def option(config: ModelConfig, quant: str, context: int, own: tuple[str, int] | None = None,
           kv_cache_dtype: str = "auto") -> Option:
    """An unplaced Option; `own` = (quantization, weight bytes) of an actual file replaces the estimate."""
    from_file = own is not None and own[0] == quant
    weights = own[1] if from_file else weights_bytes(config, quant)
    return Option(quant, weights, kv_cache_bytes(config, context, kv_cache_dtype), overhead_bytes(config),
                  from_file=from_file, kv_cache_dtype=kv_cache_dtype)


def gguf_quant(path: Path) -> str:
    """The GGUF's declared file type (Q4_K_M, ...), else its most common matrix type."""
    from ember.formats.gguf import read_header

    return read_header(path).quant


def model_from_reference(reference: str, context: int = 8192, device: str = "cpu",
                         ) -> tuple[str, ModelConfig, tuple[str, int] | None, Path]:
    """(name, shape, (the file's quantization, its weight bytes), where its files are) for any model reference
    `ember run` takes:
    a GGUF file or checkpoint folder, a store name, a discovered name (ollama/..., hf.co/..., local/...) or
    ember-default. The weight bytes are ember.store.memory.estimate_memory's on `device` (cpu, cuda, mps or
    auto), the estimator the server's model pool uses, so `ember recommend` and the pool agree on what the file
    needs."""
    from ember.store.resolve import resolve

    resolved = resolve(reference, allow_paths=True)
    read = _from_gguf if resolved.format == "gguf" else _from_folder
    return (*read(resolved.name, resolved.path, context, device), resolved.path)


def _from_gguf(name: str, path: Path, context: int, device: str) -> tuple[str, ModelConfig, tuple[str, int]]:
    from ember.formats.gguf import read_header
    from ember.store.memory import estimate_memory, model_config

    config = model_config(path)
    quant = read_header(path).quant
    weights = estimate_memory(path, context, device=device).weights_bytes
    # "Llama-3.3-70B-Instruct-Q4_K_M" names the model and the quantization; advice adds its own suffix.
    stem = name.removesuffix(".gguf") if name.lower().endswith(".gguf") else name
    name = re.sub(rf"[-._:]{re.escape(quant)}$", "", stem, flags=re.IGNORECASE) or stem
    return name, config, (quant, weights)


def _from_folder(name: str, path: Path, context: int, device: str) -> tuple[str, ModelConfig, tuple[str, int] | None]:
    from ember.store.memory import estimate_memory, model_config

    config = model_config(path)
    dtype = config.torch_dtype if config.torch_dtype in DTYPE_NAMES else None
    if dtype is None:
        return name, config, None
    return name, config, (DTYPE_NAMES[dtype], estimate_memory(path, context, dtype, device).weights_bytes)
