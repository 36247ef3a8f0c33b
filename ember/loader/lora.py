"""Reading LoRA adapters: PEFT folders (adapter_config.json + adapter_model.safetensors) and llama.cpp GGUF
adapters (general.type = adapter, adapter.type = lora), as low-rank pairs keyed by ember module names.

Each pair is (A [r, in], B [out, r]) with the adapter's scale folded into B, so the layer adds
x A^T B^T (ember.layers.lora). Scales follow the adapter's own runtime: PEFT's lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora), llama.cpp's adapter.lora.alpha / r (the adapter's value itself when
alpha is 0); either times the user's scale. Q/K rows of Llama GGUF adapters are put back in the
transformers order, as the base model's are (ember.loader.gguf_names.unpermute_rows).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ember.errors import GGUFError, LoraError
from ember.formats.gguf import GGUFFile, has_gguf_magic
from ember.loader.gguf_names import ember_name, unpermute_rows
from ember.models.decoder import CausalLM

# The projections an adapter may change: every linear layer of a decoder layer.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_RANK = 1024
_TARGET = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(TARGET_MODULES) + ")$")
_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraWeights:
    """One adapter read for one base model: module name -> (A [r, in], B [out, r] * scale). Once registered, the
    model's low-rank layers hold the tensors (ember.layers.lora) and `pairs` is emptied: they are held once."""

    name: str
    path: Path
    format: str  # "peft" | "gguf"
    rank: int
    scale: float  # the user's scale (the adapter's alpha / r is folded into the weights as well)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int = 0  # the pairs' bytes, as read

    def __post_init__(self):
        self.nbytes = sum(a.nbytes + b.nbytes for a, b in self.pairs.values())


def adapter_nbytes(path: str | Path, dtype_bytes: int = 4) -> int:
    """What an adapter will take in memory once loaded (its values in the activation dtype), from its files'
    headers only: for the memory estimator."""
    path = Path(path)
    if path.is_file() and has_gguf_magic(path):
        with GGUFFile(path, arrays="skip") as gguf:
            return sum(math.prod(info.shape) for info in gguf.tensors.values()) * dtype_bytes
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        return 0
    with safe_open(str(weights), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) * dtype_bytes


def read_lora(name: str, path: str | Path, model: CausalLM, dtype: torch.dtype, device: torch.device,
              scale: float = 1.0) -> LoraWeights:
    """Read the adapter at `path` (a PEFT folder or a GGUF file) for `model`; LoraError when it does not fit."""
    path = Path(path)
    if not math.isfinite(scale):
        raise LoraError(f"adapter {name!r}: scale must be a finite number, got {scale}")
    if path.is_dir():
        (pairs_raw, factor), fmt = _read_peft(path), "peft"
    elif path.is_file() and has_gguf_magic(path):
        try:
            (pairs_raw, factor), fmt = _read_gguf(path, model), "gguf"
        except GGUFError as err:  # a malformed file is the adapter's fault: the request's 400, not a 500
            raise LoraError(f"adapter {name!r}: {err}") from None
    else:
        raise LoraError(f"adapter {name!r}: {path} is neither a PEFT adapter folder nor a GGUF LoRA file")
    modules = dict(model.named_modules())
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks = set()
    for module_name, (a, b) in pairs_raw.items():
        for target, b_piece in model.split_checkpoint_tensor(module_name + ".weight", b):
            target = target.removesuffix(".weight")
            _check_pair(name, target, a, b_piece, modules)
            rank = a.shape[0]
            ranks.add(rank)
            pair_scale = factor(rank) * scale
            pairs[target] = (a.to(device=device, dtype=dtype).contiguous(),
                             (b_piece.float() * pair_scale).to(device=device, dtype=dtype).contiguous())
    if not pairs:
        raise LoraError(f"adapter {name!r}: {path} holds no LoRA weights")
    return LoraWeights(name, path, fmt, max(ranks), scale, pairs)


def _check_pair(name: str, target: str, a: torch.Tensor, b: torch.Tensor, modules: dict) -> None:
    if not _TARGET.match(target) or target not in modules:
        raise LoraError(f"adapter {name!r}: unsupported target module {target!r} "
                        f"(supported: {', '.join(TARGET_MODULES)} of the decoder layers)")
    module = modules[target]
    rank = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank or not 1 <= rank <= MAX_RANK:
        raise LoraError(f"adapter {name!r}: {target}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a "
                        f"rank-r pair (1 <= r <= {MAX_RANK})")
    if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
        raise LoraError(f"adapter {name!r}: {target}: A {tuple(a.shape)} B {tuple(b.shape)} do not fit the base "
                        f"model's {module.out_features}x{module.in_features} weight (another base model's adapter?)")


def _read_peft(path: Path):
    """(module name -> (A, B) float tensors, rank -> alpha factor) from a PEFT folder."""
    config_path, weights_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise LoraError(f"{path}: a PEFT adapter folder needs adapter_config.json and adapter_model.safetensors")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise LoraError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{config_path}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    for key, ok in (("use_dora", not config.get("use_dora")), ("bias", config.get("bias", "none") == "none"),
                    ("modules_to_save", not config.get("modules_to_save")),
                    ("rank_pattern", not config.get("rank_pattern")), ("alpha_pattern", not config.get("alpha_pattern"))):
        if not ok:
            raise LoraError(f"{config_path}: {key}={config.get(key)!r} is not supported")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise LoraError(f"{config_path}: lora_alpha must be a number, got {alpha!r}")
    rslora = bool(config.get("use_rslora", False))
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            for key in f.keys():
                match = _PEFT_KEY.match(key)
                if match is None:
                    raise LoraError(f"{weights_path.name}: unexpected tensor {key!r} (only lora_A/lora_B weights "
                                    "of linear layers are supported)")
                tensors.setdefault(match.group(1), {})[match.group(2)] = f.get_tensor(key).float()
    except SafetensorError as err:
        raise LoraError(f"{weights_path}: not a valid safetensors file ({err})") from None
    pairs = {}
    for module, ab in tensors.items():
        if set(ab) != {"A", "B"}:
            raise LoraError(f"{weights_path.name}: {module} has lora_{''.join(ab)} without its partner")
        pairs[module] = (ab["A"], ab["B"])
    return pairs, (lambda r: alpha / math.sqrt(r)) if rslora else (lambda r: alpha / r)


def _read_gguf(path: Path, model: CausalLM):
    """(module name -> (A, B) float tensors, rank -> alpha factor) from a llama.cpp LoRA GGUF."""
    from ember.loader.gguf_model import _float_tensor

    config = model.config
    with GGUFFile(path) as gguf:
        meta = gguf.metadata
        if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
            raise LoraError(f"{path}: not a LoRA adapter GGUF (general.type {meta.get('general.type')!r}, "
                            f"adapter.type {meta.get('adapter.type')!r})")
        if gguf.architecture != config.architecture:
            raise LoraError(f"{path}: an adapter for {gguf.architecture!r}, the base model is {config.architecture!r}")
        alpha = float(meta.get("adapter.lora.alpha", 0.0))
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for gguf_name in gguf.tensors:
            base, _, kind = gguf_name.rpartition(".")
            name = ember_name(base, config.sandwich_norm) if kind in ("lora_a", "lora_b") else None
            if name is None:
                raise LoraError(f"{path.name}: unexpected tensor {gguf_name!r}")
            tensors.setdefault(name.removesuffix(".weight"), {})[kind] = _float_tensor(gguf, gguf_name).clone()
    pairs = {}
    for module, ab in tensors.items():
        if set(ab) != {"lora_a", "lora_b"}:
            raise LoraError(f"{path.name}: {module} has {''.join(ab)} without its partner")
        a, b = ab["lora_a"], ab["lora_b"]
        if config.architecture == "llama" and module.endswith(("q_proj", "k_proj")):
            b = unpermute_rows(b, config.num_heads if module.endswith("q_proj") else config.num_kv_heads,
                               f"{path.name}: {module}.lora_b")
        pairs[module] = (a, b)
    return pairs, (lambda r: alpha / r) if alpha else (lambda r: 1.0)
