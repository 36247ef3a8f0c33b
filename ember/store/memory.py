"""Memory a model file needs at a given context on a device, from the file's actual tensors (not a per-quant
average).

weights  = what ember holds after loading the file on that device (ember.loader.gguf_model, ember.quant.linear).
           GGUF, two models:
           * native (device "cpu" where ember.kernels.native.library() is not None: x86-64 with AVX2+FMA+F16C
             and a C compiler, EMBER_NATIVE_KERNELS not 0): every matrix of a type in NATIVE_TYPES (Q4_0/1,
             Q5_0/1, Q8_0, Q4/5/6_K, IQ4_NL/XS, F16/BF16) → the file's bytes, a zero-copy view of the map that
             is never repacked (Llama's q/k rows are reordered into a copy of the same size); the token
             embedding (a QuantEmbedding, F16/BF16 ones too) → its file bytes once, and a tied output layer is
             a view of the same rows: free. The views are file-backed pages: they count in RSS as they are
             touched (forward touches every matrix, lookups the embedding rows), and that worst case is what
             is counted here.
           * repack (GPUs, and CPUs without the native library; on a native CPU, the types it does not run:
             Q2_K, Q3_K): Q4_0/Q4_1/Q4_K → int4-packed (0.5 byte a weight) + a (scale, zero) pair in the
             activation dtype per 32 where PyTorch's int4 kernels take the shape and dtype (CPU: any float
             dtype, out % 16, in % 32; CUDA: bfloat16 only, out % 8, in % 64; MPS: never); Q5_0/Q5_1/Q5_K/
             Q6_K/Q8_0 → int8 (1 byte a weight) + a float32 scale (and offset, for Q5_1/Q5_K) per group of 32
             (16 for Q6_K); other types and int4 types without those kernels → the file's bytes ("blocks");
             the token embedding → its file bytes, plus the output layer by the same rules when the file ties
             them (on CPU a tied "blocks" output is a view of the embedding's rows: free; on a GPU each module
             copies them); float matrices → the activation dtype.
           Vectors (norms, biases) → the activation dtype in both. On CPU, where tensors stay views of the
           file's map, also the file's header (metadata, the vocabulary: GGUFFile parses it through the map, so
           its pages stay resident with it; 0.7 MB for a 32000-token vocabulary). Not counted: on a native CPU
           the file pages of Llama's q/k, touched by the permuting copy and left mapped (clean pages the kernel
           can reclaim, but RSS shows them).
           Safetensors: each floating tensor's elements × the bytes of the dtype it will be loaded in
           (integer/quantized tensors keep their own size).
KV cache = 2 (K, V) × layers × KV heads × head dim × context × bytes of the activation dtype (the cache's);
           with --kv-cache-dtype int8, 2 × layers × KV heads × (head dim × 1 + 2) × context (int8 values and a
           float16 scale per token and KV head)
overhead = overhead_bytes: RUNTIME_BYTES (allocator pools, kernel workspaces, the
           framework) + ENGINE_BYTES (one loaded engine's own objects) + fp32 activations of one 512-token
           prefill batch + the tokenizer (~297 bytes a vocabulary entry); the model pool budgets with these too

tests/test_store_rss.py holds both models to a fresh process's measured RSS (weights + KV + tokenizer, 15 %).

The activation dtype is ember.loader.device.resolve_dtype's: "auto" is float32 on CPU (4 bytes a value, in
the vectors and the KV cache) and the checkpoint's dtype on a GPU (float16 for a GGUF; a safetensors folder's
config dtype, float16 when it names none). `device` is "cpu", "cuda[:N]", "mps" or "auto" (resolved as the
engine does: that one imports torch; the others never do).

`ember recommend` (ember.bench.estimates) takes a real model's figures from here, and the same KV and overhead
formulas for its per-quantization estimates. Reading a GGUF here never imports torch (ember.kernels.native,
asked whether the native kernels run here, is torch-free).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ember.config import ModelConfig
from ember.errors import EmberError, ModelLoadError
from ember.loader import dtypes
from ember.loader.dtypes import DTYPE_BYTES

GGUF_CHECKPOINT_DTYPE = "float16"  # what ember.loader.gguf_model resolves "auto" against on a GPU
DEVICE_KINDS = ("cpu", "cuda", "mps")
FLOAT_TYPES = {"F64", "F32", "F16", "BF16"}
CONTEXT_STEP = 256
# --kv-cache-dtype: "auto" keeps K/V in the activation dtype; a quantized cache stores (bytes a value, bytes of
# the scale of each token's KV head): ember.layers.kv_cache.
KV_CACHE_QUANT = {"int8": (1, 2)}  # int8 values, a float16 scale
KV_CACHE_DTYPES = ("auto", *KV_CACHE_QUANT)

PREFILL_BATCH = 512
RUNTIME_BYTES = 256 * 2**20  # allocator pools, kernels' workspaces, the framework itself
# Measured: ember's tokenizer for a 32000-token Llama (SentencePiece) vocabulary, built alone from the GGUF in a
# fresh process after a warm-up engine (the baseline of tests/test_store_rss.py), adds 9.5 MB of RSS. The GGUF
# header it comes from is counted with the file (the weights), not here.
TOKENIZER_BYTES_PER_TOKEN = 297
# Measured the same way: a second loaded engine beyond its weights, KV cache and tokenizer (scheduler and block
# tables, sampler state, the model's Python modules, heap fragmentation, library code first touched) adds
# 2.6-2.8 MB whatever the quantization or the kernel backend.
ENGINE_BYTES = 2_700_000


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
    config: ModelConfig  # an EncoderConfig for an encoder (the same size fields overhead_bytes reads)
    weights_bytes: int
    dtype: str  # the resolved activation (and KV cache) dtype
    encoder: bool = False  # embeddings / reranking: every weight a float tensor, no KV cache

    def kv_bytes_per_token(self, kv_cache_dtype: str = "auto") -> int:
        return 0 if self.encoder else kv_bytes_per_token(self.config, DTYPE_BYTES[self.dtype], kv_cache_dtype)


def device_kind(device) -> str:
    """cpu, cuda or mps for a device name ("cuda:1" → cuda); "auto" is resolved as the engine resolves it."""
    name = str(device or "auto")
    if name == "auto":
        from ember.loader.device import resolve_device  # imports torch: only for "auto"

        return resolve_device("auto").type
    kind = name.split(":")[0]
    if kind not in DEVICE_KINDS:
        raise ModelLoadError(f"unknown device {device!r} (use auto, cpu, cuda or mps)")
    return kind


def resolve_dtype_name(dtype, device: str = "cpu", checkpoint: str | None = None) -> str:
    """The activation dtype ember runs with on `device` (a name or auto): ember.loader.dtypes'."""
    return dtypes.resolve_dtype_name(dtype, device_kind(device), checkpoint)


def dtype_bytes(dtype, device: str = "cpu", checkpoint: str | None = None) -> int:
    """Bytes a value of the activation dtype `dtype` takes on `device` ("auto": 4 on CPU, 2 on a GPU)."""
    return DTYPE_BYTES[resolve_dtype_name(dtype, device, checkpoint)]


def native_types(device: str = "cpu") -> frozenset[str]:
    """The GGML type names ember multiplies natively, in the file's bytes, on `device` (empty off CPU, or on a
    CPU without the native library; asking may build it once, as the first model load would)."""
    if device_kind(device) != "cpu":
        return frozenset()
    from ember.kernels.native import NATIVE_TYPES, library  # torch-free

    return frozenset(t.name for t in NATIVE_TYPES) if library() is not None else frozenset()


# ember.quant.linear's repack backends by GGML type name (kept as names so this module needs no torch).
INT4_TYPES = {"Q4_0", "Q4_1", "Q4_K"}
INT8_GROUPS = {"Q5_0": 32, "Q5_1": 32, "Q5_K": 32, "Q6_K": 16, "Q8_0": 32}  # values per float32 scale
INT8_OFFSETS = {"Q5_1", "Q5_K"}  # types that also keep a float32 offset per group
INT4_GROUP = 32
EMBEDDING = "token_embd.weight"
# Tensors that configure the rotary embedding (read into the config, not held): ember.loader.gguf_names.
ROPE_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})


def _int4_supported(device: str, dtype: str, out_features: int, in_features: int) -> bool:
    """ember.quant.linear._int4_supported, by name."""
    if in_features % INT4_GROUP:
        return False
    if device == "cpu":
        return out_features % 16 == 0
    if device == "cuda":
        return dtype == "bfloat16" and out_features % 8 == 0 and in_features % 64 == 0
    return False


def linear_backend(type_name: str, out_features: int, in_features: int, dtype: str = "float32",
                   device: str = "cpu", native: bool = False) -> str:
    """The backend ember.quant.linear.QuantLinear picks: native, int4, int8 or blocks (`native`: the native
    CPU kernels run this type here)."""
    if native:
        return "native"
    if type_name in INT4_TYPES and _int4_supported(device, dtype, out_features, in_features):
        return "int4"
    return "int8" if type_name in INT8_GROUPS else "blocks"


def quant_linear_bytes(type_name: str, out_features: int, in_features: int, file_bytes: int, dtype: str = "float32",
                       device: str = "cpu", native: bool = False) -> int:
    """Bytes a QuantLinear holds for a [out, in] matrix of `type_name` with activations in `dtype` on `device`
    (see ember.quant.linear)."""
    n = out_features * in_features
    backend = linear_backend(type_name, out_features, in_features, dtype, device, native)
    if backend == "int4":
        return n // 2 + n // INT4_GROUP * 2 * DTYPE_BYTES[dtype]  # packed nibbles + (scale, zero) in the dtype
    if backend == "int8":
        groups = n // INT8_GROUPS[type_name]
        return n + groups * 4 * (2 if type_name in INT8_OFFSETS else 1)
    return file_bytes  # native, blocks: the file's blocks as they are


# The torch dtype each GGUF float type is already in: a float tensor in the activation dtype stays a view of the map.
FILE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def gguf_held_bytes(tensors, dtype: str = "float32", device: str = "cpu", native: frozenset[str] | None = None,
                    header_bytes: int = 0) -> int:
    """What ember holds for a GGUF's tensors (TensorInfo of ember.formats.gguf) with activations in `dtype`
    (a resolved name: float32, bfloat16, float16) on `device`; `native`: the type names the native kernels
    run (default: native_types(device)); `header_bytes`: the file's header (metadata, vocabulary), counted on
    CPU when any tensor stays a view of the map (the loader parses the header through it, so those pages are
    resident as long as the map is)."""
    device = device_kind(device)
    native = native_types(device) if native is None else native
    act = DTYPE_BYTES[dtype]
    tensors = [t for t in tensors if t.name not in ROPE_TENSORS]
    names = {t.name for t in tensors}
    total = 0
    mapped = False  # some tensor is a view of the file's map (CPU only)
    for t in tensors:
        direct = t.type_name in native and len(t.shape) > 1
        if len(t.shape) == 1 or (t.type_name in FLOAT_TYPES and not direct):
            total += t.n_elements * act  # vectors and float matrices: plain weights in the activation dtype
            mapped |= device == "cpu" and FILE_DTYPES.get(t.type_name) == dtype  # already that dtype: a view
            continue
        shape = (t.shape[0], t.n_elements // t.shape[0])
        backend = linear_backend(t.type_name, *shape, dtype, device, direct)
        if t.name == EMBEDDING:
            total += t.nbytes  # QuantEmbedding keeps the blocks (a view of the map on CPU)
            mapped |= device == "cpu"
            # Tied: the same rows as the output layer, a view of them where that layer keeps the blocks on CPU.
            if "output.weight" not in names and not (backend == "native" or (backend == "blocks" and device == "cpu")):
                total += quant_linear_bytes(t.type_name, *shape, t.nbytes, dtype, device)
            continue
        mapped |= device == "cpu" and backend in ("native", "blocks")
        total += quant_linear_bytes(t.type_name, *shape, t.nbytes, dtype, device, direct)
    return total + (header_bytes if mapped else 0)


def _gguf_shape(path: Path, dtype, device: str, weights: bool = True) -> _Shape:
    from ember.encoder_config import encoder_config_from_gguf, is_encoder_gguf
    from ember.formats.gguf import ArrayInfo, read_header
    from ember.loader.gguf_config import config_from_gguf

    summary = read_header(path)
    metadata = {k: v for k, v in summary.metadata.items() if not isinstance(v, ArrayInfo)}
    shapes = {t.name: t.shape for t in summary.tensors.values()}
    name = resolve_dtype_name(dtype, device, GGUF_CHECKPOINT_DTYPE)
    if is_encoder_gguf(metadata):  # the loader dequantizes an encoder's blocks: float tensors in `name`
        held = sum(t.n_elements for t in summary.tensors.values()) * DTYPE_BYTES[name] if weights else 0
        return _Shape(encoder_config_from_gguf(metadata, shapes), held, name, encoder=True)
    config = config_from_gguf(metadata, shapes, {})
    held = gguf_held_bytes(summary.tensors.values(), name, device, header_bytes=summary.data_offset) if weights else 0
    return _Shape(config, held, name)


def _safetensors_shape(folder: Path, dtype, device: str, weights: bool = True) -> _Shape:
    from ember.config import config_from_hf, read_config_json
    from ember.encoder_config import encoder_config_from_hf, is_encoder_config
    from ember.models.registry import model_class_for
    from ember.store.info import SAFETENSORS_DTYPE_BYTES, safetensors_tensors

    raw = read_config_json(folder)
    encoder = is_encoder_config(raw)
    if encoder:
        config = encoder_config_from_hf(raw, folder)
    else:
        _, arch = model_class_for(raw.get("architectures"), raw.get("model_type"))
        config = config_from_hf(raw, arch)
    name = resolve_dtype_name(dtype, device, config.torch_dtype)
    if not weights:
        return _Shape(config, 0, name, encoder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no .safetensors files")
    target = DTYPE_BYTES[name]
    held = 0
    for _, tensor_dtype, n in safetensors_tensors(files):
        held += n * (target if tensor_dtype in FLOAT_TYPES else SAFETENSORS_DTYPE_BYTES.get(tensor_dtype, 1))
    return _Shape(config, held, name, encoder)


def _shape(path: str | Path, dtype, device: str = "cpu", weights: bool = True) -> _Shape:
    path = Path(path).expanduser()
    if path.is_dir():
        return _safetensors_shape(path, dtype, device_kind(device), weights)
    if path.is_file():
        return _gguf_shape(path, dtype, device_kind(device), weights)
    raise ModelLoadError(f"{path}: no such model file or folder")


def model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a GGUF file or checkpoint folder, from headers only (decoders: an encoder has none)."""
    shape = _shape(path, "float32", "cpu", weights=False)
    if shape.encoder:
        raise ModelLoadError(f"{Path(path).name} is an encoder (embeddings or reranking), not a text generator")
    return shape.config


def kv_bytes_per_token(config: ModelConfig, kv_dtype_bytes: int = 2, kv_cache_dtype: str = "auto") -> int:
    """K and V of one token in every layer: `kv_dtype_bytes` a value for an "auto" cache (the activation
    dtype's), else the quantized cache's value bytes plus one scale per KV head (ember.layers.kv_cache)."""
    if kv_cache_dtype == "auto":
        value, scale = kv_dtype_bytes, 0
    else:
        value, scale = KV_CACHE_QUANT[kv_cache_dtype]
    return 2 * config.num_layers * config.num_kv_heads * (config.head_dim * value + scale)


def tokenizer_bytes(config: ModelConfig) -> int:
    """The tokenizer ember builds from the model's vocabulary (Python strings, id maps, merges)."""
    return config.vocab_size * TOKENIZER_BYTES_PER_TOKEN


def overhead_bytes(config: ModelConfig) -> int:
    per_token = 4 * config.hidden_size + 2 * config.intermediate_size  # residual, q/k/v/o, gate/up
    return RUNTIME_BYTES + ENGINE_BYTES + PREFILL_BATCH * per_token * 4 + tokenizer_bytes(config)


def adapters_bytes(adapters, dtype: str, device: str = "cpu", lora_dtype: str = "auto") -> int:
    """LoRA adapters' (PEFT folders, GGUF files) values as the engine holds them: in the dtype
    ember.loader.dtypes.resolve_lora_dtype_name picks for activations in `dtype` on `device`."""
    if not adapters:
        return 0  # without adapters, estimates stay free of torch (the reader below imports it)
    from ember.loader.lora import adapter_nbytes

    held = DTYPE_BYTES[dtypes.resolve_lora_dtype_name(lora_dtype, dtype, device)]
    return sum(adapter_nbytes(path, held) for path in adapters)


def estimate_memory(path: str | Path, context: int, dtype: str = "bfloat16", device: str = "cpu",
                    kv_cache_dtype: str = "auto", adapters=(), lora_dtype: str = "auto") -> MemoryEstimate:
    """Bytes to run the model at `path` on `device` with activations and `context` tokens of KV cache in
    `dtype` ("auto": as the engine resolves it on that device), the cache quantized as `kv_cache_dtype` asks,
    with the LoRA `adapters` (paths) loaded too, in `lora_dtype` (EngineArgs.lora_dtype): they count with the
    weights."""
    if not isinstance(context, int) or context <= 0:
        raise ModelLoadError(f"context must be a positive integer, not {context!r}")
    shape = _shape(path, dtype, device)
    return MemoryEstimate(shape.weights_bytes + adapters_bytes(adapters, shape.dtype, device_kind(device), lora_dtype),
                          shape.kv_bytes_per_token(kv_cache_dtype) * context, overhead_bytes(shape.config), context)


def fit_context(path: str | Path, budget_bytes: int, wanted: int, dtype: str = "bfloat16", device: str = "cpu",
                kv_cache_dtype: str = "auto", adapters=(), lora_dtype: str = "auto") -> int:
    """The largest context ≤ `wanted` that fits in `budget_bytes` on `device`: `wanted` itself when it fits,
    else the largest multiple of 256 that does; EmberError when not even 256 tokens fit."""
    shape = _shape(path, dtype, device)
    held = adapters_bytes(adapters, shape.dtype, device_kind(device), lora_dtype)
    fixed = shape.weights_bytes + held + overhead_bytes(shape.config)
    per_token = shape.kv_bytes_per_token(kv_cache_dtype)
    if fixed + per_token * wanted <= budget_bytes:
        return wanted
    fits = (budget_bytes - fixed) // per_token if budget_bytes > fixed else 0
    context = min(fits, wanted) // CONTEXT_STEP * CONTEXT_STEP
    if context < CONTEXT_STEP:
        need = fixed + per_token * CONTEXT_STEP
        raise EmberError(f"{Path(path).name} needs {need / 2**30:.2f} GiB for even {CONTEXT_STEP} tokens of "
                         f"context; {budget_bytes / 2**30:.2f} GiB available")
    return context
