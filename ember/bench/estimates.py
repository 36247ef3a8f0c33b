"""Memory of a model at one quantization and context: the figures `ember recommend` places on a machine.

weights  = parameters × effective bits per weight ÷ 8 (the file's tensor bytes for its own quantization)
KV cache = 2 (K, V) × layers × KV heads × head dim × context × 2 bytes (an f16 cache, one sequence)
overhead = runtime + activations of one 512-token prefill batch (fp32)
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from ember.bench.advice import Option
from ember.bench.shapes import parameter_count
from ember.config import ModelConfig
from ember.errors import ModelLoadError

# Averages over whole GGUF files as llama-quantize writes them (mixes keep some tensors at higher
# precision): e.g. Llama-3.3-70B Q4_K_M is 42.5 GB for 70.6 B parameters = 4.82 bits.
BITS_PER_WEIGHT = {"F16": 16.0, "BF16": 16.0, "F32": 32.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K_M": 5.69,
                   "Q4_K_M": 4.85, "Q3_K_M": 3.91, "Q2_K": 2.99}
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # as GGUF names them
KV_BYTES_PER_ELEMENT = 2
PREFILL_BATCH = 512
RUNTIME_BYTES = 256 * 2**20  # allocator pools, kernels' workspaces, the framework itself


def kv_cache_bytes(config: ModelConfig, context: int) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * context * KV_BYTES_PER_ELEMENT


def overhead_bytes(config: ModelConfig) -> int:
    per_token = 4 * config.hidden_size + 2 * config.intermediate_size  # residual, q/k/v/o, gate/up
    return RUNTIME_BYTES + PREFILL_BATCH * per_token * 4


def weights_bytes(config: ModelConfig, quant: str) -> int:
    return int(parameter_count(config) * BITS_PER_WEIGHT[quant] / 8)


def option(config: ModelConfig, quant: str, context: int, own: tuple[str, int] | None = None) -> Option:
    """An unplaced Option; `own` = (quantization, weight bytes) of an actual file replaces the estimate."""
    from_file = own is not None and own[0] == quant
    weights = own[1] if from_file else weights_bytes(config, quant)
    return Option(quant, weights, kv_cache_bytes(config, context), overhead_bytes(config), from_file=from_file)


def gguf_quant(path: Path) -> str:
    import gguf

    return _declared_quant(gguf.GGUFReader(path))


def _declared_quant(reader) -> str:
    """The GGUF's declared file type (Q4_K_M, ...), else its most common matrix type."""
    import gguf

    field = reader.fields.get("general.file_type")
    if field is not None:
        try:
            return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    types = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    return types.most_common(1)[0][0] if types else "unknown"


def model_from_reference(reference: str) -> tuple[str, ModelConfig, tuple[str, int] | None]:
    """(name, shape, (the file's quantization, its weight bytes)) for a GGUF file or a checkpoint folder."""
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _from_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _from_folder(path)
    raise ModelLoadError(f"{reference!r} is not a GGUF file or a folder with config.json")


def _from_gguf(path: Path) -> tuple[str, ModelConfig, tuple[str, int]]:
    import gguf

    from ember.loader.gguf_config import config_from_gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({err})") from None
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    # GGUF lists dimensions innermost first; ModelConfig reads them in PyTorch's order.
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    config = config_from_gguf(metadata, shapes, {})
    weight_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    quant = _declared_quant(reader)
    # "Llama-3.3-70B-Instruct-Q4_K_M" names the model and the quantization; advice adds its own suffix.
    name = re.sub(rf"[-._]{re.escape(quant)}$", "", path.stem, flags=re.IGNORECASE) or path.stem
    return name, config, (quant, weight_bytes)


def _from_folder(path: Path) -> tuple[str, ModelConfig, tuple[str, int] | None]:
    from ember.config import config_from_hf, read_config_json
    from ember.models.registry import model_class_for

    raw = read_config_json(path)
    _, arch = model_class_for(raw.get("architectures"), raw.get("model_type"))
    config = config_from_hf(raw, arch)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    dtype = DTYPE_NAMES.get(config.torch_dtype or "")
    return path.name, config, (dtype, size) if dtype and size else None
