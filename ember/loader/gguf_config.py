"""ModelConfig from GGUF metadata (`general.architecture` and its `<arch>.*` keys)."""

from __future__ import annotations

from typing import Any

from ember.config import ModelConfig, layer_count
from ember.errors import GGUFError

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma2")


def config_from_gguf(metadata: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                     rope_tensors: dict[str, list[float]]) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise GGUFError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = metadata.get(f"{arch}.{name}", default)
        if required and value is None:
            raise GGUFError(f"GGUF metadata lacks {arch}.{name}")
        return value

    hidden = int(key("embedding_length", required=True))
    num_heads = int(key("attention.head_count", required=True))
    num_layers = layer_count(key("block_count", required=True))
    num_kv = key("attention.head_count_kv", num_heads)
    if isinstance(num_kv, list):  # per-layer counts; ember needs one value
        if len(set(num_kv)) != 1:
            raise GGUFError("GGUF files with a different KV head count per layer are not supported")
        num_kv = num_kv[0]
    head_dim = int(key("attention.key_length", hidden // num_heads))
    embed_shape = tensor_shapes.get("token_embd.weight")
    if embed_shape is None:
        raise GGUFError("GGUF file has no token_embd.weight tensor")
    vocab = int(embed_shape[0])
    context = int(key("context_length", 4096))
    rope_dims = int(key("rope.dimension_count", head_dim))
    scaling: dict[str, Any] = {"rope_type": "default"}
    scaling_type = key("rope.scaling.type")
    original = key("rope.scaling.original_context_length")
    if "rope_freqs.weight" in rope_tensors:  # Llama 3.1+: llama3 scaling baked into per-frequency factors
        scaling = {"rope_type": "freq_factors", "factors": rope_tensors["rope_freqs.weight"]}
    elif "rope_factors_long.weight" in rope_tensors:  # Phi-3 longrope
        scaling = {
            "rope_type": "longrope",
            "long_factor": rope_tensors["rope_factors_long.weight"],
            "short_factor": rope_tensors["rope_factors_short.weight"],
            "original_max_position_embeddings": int(original or context),
        }
        if key("rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = float(key("rope.scaling.attn_factor"))
    elif scaling_type == "linear":
        scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor", 1.0))}
    elif scaling_type == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(key("rope.scaling.factor", 1.0)),
                   "original_max_position_embeddings": int(original or context)}
    gemma = arch == "gemma2"
    window = key("attention.sliding_window")
    if gemma:
        windows = [int(window or 4096) if i % 2 == 0 else None for i in range(num_layers)]
    else:
        windows = [int(window) if window else None] * num_layers
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(num_kv),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=context,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        partial_rotary_factor=rope_dims / head_dim,
        tie_word_embeddings="output.weight" not in tensor_shapes,
        qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_shapes,
        hidden_act="gelu_pytorch_tanh" if gemma else "silu",
        embed_scale=float(hidden) ** 0.5 if gemma else None,
        # llama.cpp stores Gemma's norms as 1 + w; the loader subtracts the 1 again for ember's RMSNorm.
        norm_weight_offset=1.0 if gemma else 0.0,
        sandwich_norm=gemma,
        attn_logit_softcap=key("attn_logit_softcapping") if gemma else None,
        final_logit_softcap=key("final_logit_softcapping") if gemma else None,
        # Gemma 2 27B (46 layers) scales queries by hidden/heads, not head_dim, as llama.cpp does.
        attn_scale=(hidden // num_heads if gemma and num_layers == 46 else head_dim) ** -0.5,
        sliding_windows=windows,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[int(eos)] if eos is not None else [],
    )
