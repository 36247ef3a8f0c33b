"""GGUF tensor names -> ember parameter names, and the layout fixes llama.cpp's converter applied.

Kept out of the model code: models only know the transformers names.
"""

from __future__ import annotations

import re

import torch

from ember.errors import GGUFError

# per-layer GGUF suffix -> ember suffix (under model.layers.N.)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",  # Phi-3, split by the model class
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Which norm sits where differs between plain and sandwich-norm (Gemma 2) layouts.
_PLAIN_NORMS = {"ffn_norm": "post_attention_layernorm"}
_SANDWICH_NORMS = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors that configure rotary embeddings rather than being parameters.
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

_LAYER = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def ember_name(gguf_name: str, sandwich_norm: bool) -> str | None:
    """The ember parameter for a GGUF tensor, or None when ember does not use it."""
    match = _LAYER.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        norms = _SANDWICH_NORMS if sandwich_norm else _PLAIN_NORMS
        target = _LAYER_NAMES.get(part) or norms.get(part)
        return None if target is None else f"model.layers.{layer}.{target}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    target = _GLOBAL_NAMES.get(base)
    return None if target is None else f"{target}.{kind}"

# Encoders (bert, nomic-bert) -> ember.models.bert's names; attn_qkv (nomic-bert) is split by the loader.
_ENCODER_LAYER_NAMES = {
    "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_qkv": "attn.qkv_proj",
    "attn_output": "attn.o_proj", "attn_output_norm": "attn_norm", "ffn_up": "mlp.up_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_down": "mlp.down_proj", "layer_output_norm": "mlp_norm",
}
_ENCODER_GLOBAL_NAMES = {
    "token_embd": "embeddings.word", "token_types": "embeddings.token_type", "position_embd": "embeddings.position",
    "token_embd_norm": "embeddings.norm", "cls": "head.dense", "cls.output": "head.out",
}


def encoder_name(gguf_name: str) -> str | None:
    """The ember encoder parameter for a GGUF tensor, or None when ember does not know it."""
    match = _LAYER.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        target = _ENCODER_LAYER_NAMES.get(part)
        return None if target is None else f"layers.{layer}.{target}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    target = _ENCODER_GLOBAL_NAMES.get(base)
    return None if target is None else f"{target}.{kind}"


def unpermute_rows(rows: torch.Tensor, num_heads: int, name: str) -> torch.Tensor:
    """Undo the row order llama.cpp's converter gives Llama's q/k weights.

    The converter interleaves each head's two rotary halves (row i of the first half next to row i of the
    second) for its interleaved rope; ember's rotary is rotate-half like transformers, so put them back.
    Works on any per-row data (float rows or rows of quantized blocks).
    """
    if rows.shape[0] % (2 * num_heads):
        raise GGUFError(f"tensor {name!r}: {rows.shape[0]} rows do not split into {num_heads} heads of two "
                        "rotary halves")
    head_rows = rows.shape[0] // num_heads
    return rows.reshape(num_heads, head_rows // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)
