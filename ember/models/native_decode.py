"""The decoder's layers as one native call on decode-only steps (ember.kernels.decode_layers), where they allow it.

It applies to Llama-order layers (llama, mistral, qwen2 with its q/k/v bias, ...) whose projections all run on the
native kernels with the norms folded in (CausalLM.fuse_projections: float32 activations on a CPU with the
kernels), silu(gate) * up formed by down_proj's kernel, no q/k norms, and a float32 or int8 cache. Everything
else (Qwen3's q/k norms, Gemma's sandwich norms and gelu, LoRA adapters, which wrap the projections; prefill or
mixed steps) keeps the module-by-module path. Both compute the same numbers with the same kernels.
``EMBER_NATIVE_DECODE=0`` turns it off (A/B measurements).
"""

from __future__ import annotations

import os

import torch

from ember.kernels.decode_layers import DecodeLayers, LayerWeights
from ember.kernels.native import library
from ember.models.decoder import DecoderModel
from ember.quant.linear import FusedLinear, QuantLinear

MAX_GROUP_DIM = 8192  # attention.c's limit on query heads per KV head x head_dim


def enabled() -> bool:
    return os.environ.get("EMBER_NATIVE_DECODE", "1").strip().lower() not in ("0", "false", "no", "off")


def _qkv_bias(qkv: FusedLinear) -> torch.Tensor | None:
    biases = [p.bias for p in qkv.parts]
    if all(b is None for b in biases):
        return None
    return torch.cat([torch.zeros(p.out_features) if b is None else b.float() for p, b in zip(qkv.parts, biases,
                                                                                             strict=True)])


def _layer_weights(layer) -> LayerWeights | None:
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
    if not (layer.norms_in_projections and mlp.silu_in_down and attn.q_norm is None
            and type(qkv) is FusedLinear and type(gate_up) is FusedLinear
            and type(o) is QuantLinear and type(down) is QuantLinear  # LoRA wraps them: not these types then
            and o.backend == "native" and o.bias is None and down.bias is None and o.dtype == torch.float32
            and qkv.folded_norm is not None and gate_up.folded_norm is not None
            and attn.k_cache is not None and attn.k_cache.dtype in (torch.float32, torch.int8)
            and attn.k_cache.device.type == "cpu"):
        return None
    return LayerWeights(qkv.native, qkv.folded_norm, _qkv_bias(qkv), o.native, gate_up.native, gate_up.folded_norm,
                        down.native, attn.k_cache, attn.v_cache, attn.k_scale, attn.v_scale, attn.scale, attn.softcap,
                        attn.window)


def build(model) -> DecodeLayers | None:
    """The native stack for a DecoderModel's layers with their current caches, or None where it does not apply."""
    if not enabled() or not isinstance(model, DecoderModel) or not len(model.layers) or library() is None:
        return None
    layers = list(model.layers)
    first = layers[0].self_attn
    heads, kv_heads, head_dim = first.num_heads, first.num_kv_heads, first.head_dim
    if head_dim % 8 or heads % kv_heads or heads // kv_heads * head_dim > MAX_GROUP_DIM or model.rotary.dim % 2:
        return None
    weights = [_layer_weights(layer) for layer in layers]
    if any(w is None for w in weights):
        return None
    return DecodeLayers(weights, heads, kv_heads, head_dim, model.rotary.dim)
