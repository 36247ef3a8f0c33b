"""ModelConfig: one normalised description of a decoder model, from config.json or GGUF metadata.

Everything the shared layers need is a plain field here, so model code never looks at raw configs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import ModelLoadError

MAX_LAYERS = 1024
MAX_DIM = 1 << 20


def layer_count(value: Any) -> int:
    """A layer count checked before anything is sized by it (per-layer lists, the KV cache)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_LAYERS:
        raise ModelLoadError(f"config: num_hidden_layers={value!r} is out of range (1 to {MAX_LAYERS})")
    return value


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


@dataclass
class ModelConfig:
    architecture: str  # registry key, e.g. "llama", "qwen2", "gemma2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # {"rope_type": ..., factor, ...}
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rotary
    hidden_act: str = "silu"
    # Gemma-style details
    embed_scale: float | None = None  # multiply embeddings by this (sqrt(hidden) for Gemma)
    norm_weight_offset: float = 0.0  # RMSNorm scales by (offset + weight); Gemma uses 1
    sandwich_norm: bool = False  # extra norms after attention and after the MLP
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    attn_scale: float | None = None  # None means head_dim ** -0.5
    sliding_windows: list[int | None] = field(default_factory=list)  # per layer, None = full attention
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None  # the checkpoint's dtype

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 < value <= MAX_DIM:
                raise ModelLoadError(f"config: {name}={value!r} is not a positive integer ≤ {MAX_DIM}")
        layer_count(self.num_layers)
        if not _positive_number(self.rope_theta):
            raise ModelLoadError(f"config: rope_theta={self.rope_theta!r} is not a positive number")
        if not _positive_number(self.partial_rotary_factor) or self.partial_rotary_factor > 1:
            raise ModelLoadError(f"config: partial_rotary_factor={self.partial_rotary_factor!r} is not in (0, 1]")
        if (not isinstance(self.max_position_embeddings, int) or isinstance(self.max_position_embeddings, bool)
                or self.max_position_embeddings < 1):
            raise ModelLoadError(f"config: max_position_embeddings={self.max_position_embeddings!r} is not a "
                                 "positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"config: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_layers
        if len(self.sliding_windows) != self.num_layers:
            raise ModelLoadError("config: layer_types does not list every layer")

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", "default")


def _rope_settings(raw: dict[str, Any]) -> tuple[float, dict[str, Any], float]:
    """Read rope theta, scaling and partial factor from both the transformers 4 and 5 layouts."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    partial = float(merged.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    rope_type = merged.pop("rope_type", merged.pop("type", "default"))
    if rope_type in ("su", "longrope"):  # Phi-3's early name for longrope
        rope_type = "longrope"
    if rope_type in ("dynamic", "yarn", "longrope", "llama3") or "original_max_position_embeddings" in raw:
        merged.setdefault(
            "original_max_position_embeddings",
            raw.get("original_max_position_embeddings", raw.get("max_position_embeddings")),
        )
    merged["rope_type"] = rope_type
    return theta, merged, partial


def _sliding_windows(raw: dict[str, Any], num_layers: int) -> list[int | None]:
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if raw.get("use_sliding_window") is False or window is None:
        if raw.get("model_type") != "gemma2":
            return [None] * num_layers
    if raw.get("model_type") == "gemma2":
        window = window or 4096
        layer_types = layer_types or [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
        ]
    if layer_types:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    if raw.get("model_type") in ("qwen2", "qwen3"):
        first = raw.get("max_window_layers", 0)
        return [window if i >= first else None for i in range(num_layers)]
    return [window] * num_layers


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def config_from_hf(raw: dict[str, Any], architecture: str) -> ModelConfig:
    """Build a ModelConfig from a transformers config.json dict for a known architecture."""
    try:
        num_heads = raw["num_attention_heads"]
        hidden = raw["hidden_size"]
        num_layers = layer_count(raw["num_hidden_layers"])
        theta, scaling, partial = _rope_settings(raw)
        gemma = architecture == "gemma2"
        head_dim = raw.get("head_dim") or hidden // num_heads
        return ModelConfig(
            architecture=architecture,
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=partial,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", gemma)),
            qkv_bias=bool(raw.get("attention_bias", architecture == "qwen2")),
            qk_norm=architecture == "qwen3",
            hidden_act=raw.get("hidden_activation") or raw.get("hidden_act", "silu"),
            embed_scale=float(hidden) ** 0.5 if gemma else None,
            norm_weight_offset=1.0 if gemma else 0.0,
            sandwich_norm=gemma,
            attn_logit_softcap=raw.get("attn_logit_softcapping") if gemma else None,
            final_logit_softcap=raw.get("final_logit_softcapping") if gemma else None,
            attn_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5 if gemma else None,
            sliding_windows=_sliding_windows(raw, num_layers),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_id_list(raw.get("eos_token_id")),
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )
    except KeyError as missing:
        raise ModelLoadError(f"config.json: missing required field {missing}") from None
    except (TypeError, ValueError) as bad:
        raise ModelLoadError(f"config.json: malformed value ({bad})") from None


def read_config_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (expected a transformers checkpoint folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    # Every reader dispatches on these two before looking at anything else.
    architectures = raw.get("architectures")
    if architectures is not None and (not isinstance(architectures, list)
                                      or not all(isinstance(a, str) for a in architectures)):
        raise ModelLoadError(f"{path}: architectures must be a list of names, not {architectures!r:.80}")
    if raw.get("model_type") is not None and not isinstance(raw["model_type"], str):
        raise ModelLoadError(f"{path}: model_type must be a name, not {raw['model_type']!r:.80}")
    return raw
