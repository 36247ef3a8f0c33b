"""Whole decoder stacks for decode-only steps through the native library (see decode_layers.c)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from ember.kernels.matmul import MAX_SEGMENTS, NativeMatmul
from ember.kernels.native import library

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Linear(ctypes.Structure):
    _fields_ = [("nseg", ctypes.c_int), ("w", _p * MAX_SEGMENTS), ("types", ctypes.c_int * MAX_SEGMENTS),
                ("rows", _i64 * MAX_SEGMENTS), ("row_bytes", _i64 * MAX_SEGMENTS)]

    @classmethod
    def of(cls, native: NativeMatmul) -> _Linear:
        segments = native.segments
        out = cls(nseg=len(segments))
        for i, (address, ggml_type, rows, row_bytes) in enumerate(segments):
            out.w[i], out.types[i], out.rows[i], out.row_bytes[i] = address, ggml_type, rows, row_bytes
        return out


class _Layer(ctypes.Structure):  # decode_layers.c's layer_t
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear),
                ("attn_norm", _p), ("mlp_norm", _p), ("qkv_bias", _p), ("k_cache", _p), ("v_cache", _p),
                ("k_scale", _p), ("v_scale", _p), ("attn_eps", _f32), ("mlp_eps", _f32), ("scale", _f32),
                ("softcap", _f32), ("window", _i64)]


@dataclass
class LayerWeights:
    """One layer as decode_layers.c runs it: the native products (q/k/v and gate/up fused, each with the RMSNorm
    before it as (float32 weight, eps)), the cache tensors of ember.layers.attention.Attention, and its
    attention parameters."""

    qkv: NativeMatmul
    attn_norm: tuple[torch.Tensor, float]
    qkv_bias: torch.Tensor | None  # float32 [q + k + v columns]
    o: NativeMatmul
    gate_up: NativeMatmul
    mlp_norm: tuple[torch.Tensor, float]
    down: NativeMatmul
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    scale: float
    softcap: float | None
    window: int | None


class DecodeLayers:
    """Runs a stack of layers for single-token decodes in one native call; built once per model and cache."""

    def __init__(self, layers: list[LayerWeights], heads: int, kv_heads: int, head_dim: int, rotary_dim: int):
        self.lib = library()
        if self.lib is None:
            raise RuntimeError("native kernels are unavailable")
        self.heads, self.kv_heads, self.head_dim, self.rotary_dim = heads, kv_heads, head_dim, rotary_dim
        self.hidden = layers[0].qkv.in_features if layers else 0
        self.inter = layers[0].down.in_features if layers else 0
        self._keep = layers  # the tensors whose addresses the structs hold
        self._layers = (_Layer * len(layers))()
        for out, w in zip(self._layers, layers, strict=True):
            out.qkv, out.o, out.gate_up, out.down = (_Linear.of(m) for m in (w.qkv, w.o, w.gate_up, w.down))
            out.attn_norm, out.attn_eps = w.attn_norm[0].data_ptr(), w.attn_norm[1]
            out.mlp_norm, out.mlp_eps = w.mlp_norm[0].data_ptr(), w.mlp_norm[1]
            out.qkv_bias = None if w.qkv_bias is None else w.qkv_bias.data_ptr()
            out.k_cache, out.v_cache = w.k_cache.data_ptr(), w.v_cache.data_ptr()
            out.k_scale = None if w.k_scale is None else w.k_scale.data_ptr()
            out.v_scale = None if w.v_scale is None else w.v_scale.data_ptr()
            out.scale, out.softcap, out.window = w.scale, w.softcap or 0.0, w.window or 0

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                 lens: torch.Tensor, blocks: torch.Tensor | None, start: int, block_size: int) -> None:
        """x [B, hidden] float32, contiguous, updated in place: the residual stream after every layer. cos, sin
        [B, rotary_dim] float32 (RotaryEmbedding.prepare's tables), slots [B] int64 where each token's K/V goes,
        lens [B] int64 context lengths, blocks [B * max_blocks] int64 block ids or None (one sequence whose
        context is slots start..)."""
        batch = x.shape[0]
        max_blocks = 0 if blocks is None else blocks.numel() // batch
        rc = self.lib.ember_decode_layers(
            self._layers, len(self._layers), self.hidden, self.inter, self.heads, self.kv_heads, self.head_dim,
            self.rotary_dim, x.data_ptr(), batch, cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
            None if blocks is None else blocks.data_ptr(), max_blocks, start, lens.data_ptr(), block_size,
            torch.get_num_threads())
        if rc:
            raise RuntimeError("the native decode layers refused their arguments")
