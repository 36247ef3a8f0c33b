"""Grouped-query attention over a paged KV cache.

The runner flattens a step's tokens into one batch: single-token decodes first, then prefill chunks.
Each layer writes its new K/V into cache slots (`slot_mapping`) and reads each sequence's context back
whole blocks at a time (a block is one contiguous [block_size, kv_heads, head_dim] chunk of the cache), so a
decode step touches only the blocks its sequences own. A context whose blocks happen to be consecutive (one
sequence on a fresh cache, say) is read as a plain slice of the cache: no copy at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ember.config import ModelConfig
from ember.kernels.attention import causal_attention, decode_attention
from ember.layers import kv_cache
from ember.layers.mlp import make_linear
from ember.layers.norm import RMSNorm
from ember.layers.rotary import RotaryEmbedding


@dataclass
class PrefillSlice:
    start: int  # offset of this sequence's queries in the flat batch
    length: int  # number of new tokens (queries)
    context_len: int  # cached + new tokens it attends to
    # Where the context is read when something was cached before (context_len > length): its first
    # ceil(context_len / block_size) blocks, or, when those are consecutive, the first slot of the run (a slice).
    context_blocks: torch.Tensor | None = None
    context_start: int = 0

    @property
    def reads_cache(self) -> bool:
        return self.context_len > self.length


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    block_size: int = 1
    num_decode: int = 0
    # [D * ceil(max_context / block_size)] block ids, row-major, padded with block 0 past a shorter context;
    # None when there is one decode whose blocks are consecutive: it reads slots decode_start.. as a slice.
    decode_blocks: torch.Tensor | None = None
    decode_start: int = 0
    decode_lens: torch.Tensor | None = None  # [D]
    decode_width: int = 0  # max_context: the longest decode context this step
    decode_padded: bool = False  # whether some decode context is shorter than decode_width (needs a mask)
    prefills: list[PrefillSlice] = field(default_factory=list)
    # Reusable outputs of the block gathers, by name (the runner passes one dict for all its steps): every
    # layer's gather has the same size, and a fresh multi-MB tensor per call would be page-faulted in anew.
    scratch: dict = field(default_factory=dict)
    _masks: dict = field(default_factory=dict)  # shared by every layer of one step

    def decode_mask(self, window: int | None) -> torch.Tensor | None:
        """[D, 1, 1, max_context] keys each decode attends to; None when that is every key (no padding)."""
        if not self.decode_padded and (window is None or window >= self.decode_width):
            return None
        key = ("decode", window)
        if key not in self._masks:
            cols = torch.arange(self.decode_width, device=self.decode_lens.device)[None, :]
            lens = self.decode_lens[:, None]
            mask = cols < lens
            if window is not None:
                mask &= cols > lens - 1 - window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, index: int, window: int | None, device: torch.device) -> torch.Tensor:
        key = ("prefill", index, window)
        if key not in self._masks:
            piece = self.prefills[index]
            query_pos = torch.arange(piece.context_len - piece.length, piece.context_len, device=device)[:, None]
            key_pos = torch.arange(piece.context_len, device=device)[None, :]
            mask = key_pos <= query_pos
            if window is not None:
                mask &= key_pos > query_pos - window
            self._masks[key] = mask
        return self._masks[key]

    def gather_buffer(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        """A [rows, like.shape[1]] tensor of like's dtype and device, reused across layers and steps."""
        numel = rows * like.shape[1]
        buffer = self.scratch.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            # Grow by at least half again: a context that grows a block per step reallocates rarely.
            size = max(numel, buffer.numel() * 3 // 2 if buffer is not None else 0)
            buffer = self.scratch[name] = torch.empty(size, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(rows, like.shape[1])


def attend(q, k, v, mask, scale: float, softcap: float | None, causal: bool = False):
    """softmax(q k^T * scale) v over [B, heads, L, D] tensors; tanh soft-capping needs the explicit form."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=True
        )
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None and causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.attn_scale if config.attn_scale is not None else self.head_dim**-0.5
        self.softcap = config.attn_logit_softcap
        self.window = config.sliding_windows[layer_index]
        hidden, q_size, kv_size = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = make_linear(hidden, q_size, config.qkv_bias)
        self.k_proj = make_linear(hidden, kv_size, config.qkv_bias)
        self.v_proj = make_linear(hidden, kv_size, config.qkv_bias)
        self.o_proj = make_linear(q_size, hidden)
        self.qkv_proj = None  # q, k and v in one call, when the loader could fuse them (fuse_projections)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_weight_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, config.norm_weight_offset)
        else:
            self.q_norm = self.k_norm = None
        # Set by the model runner: this layer's slice of the paged cache, [num_slots, kv_heads, head_dim], and for
        # a quantized cache (ember.layers.kv_cache) the scales of its rows, [num_slots, kv_heads]; None otherwise.
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def forward(self, x, cos, sin, rotary: RotaryEmbedding, meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x) if self.qkv_proj is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)
        self._write(k, v, meta.slot_mapping)

        if meta.num_decode == tokens:  # a decode-only step: no prefill rows to interleave
            out = self._decode(q, meta)
            return self.o_proj(out.view(tokens, self.num_heads * self.head_dim))
        out = torch.empty_like(q)
        if meta.num_decode:
            out[: meta.num_decode] = self._decode(q[: meta.num_decode], meta)
        for index, piece in enumerate(meta.prefills):
            span = slice(piece.start, piece.start + piece.length)
            out[span] = self._prefill(q[span], k[span], v[span], piece, index, meta)
        return self.o_proj(out.view(tokens, self.num_heads * self.head_dim))

    def _write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store the new tokens' K/V in their cache slots, quantized per token and KV head when the cache is."""
        for new, cache, scales in ((k, self.k_cache, self.k_scale), (v, self.v_cache, self.v_scale)):
            if scales is None:
                cache.index_copy_(0, slots, new.to(cache.dtype))
            else:
                values, scale = kv_cache.quantize(new)
                cache.index_copy_(0, slots, values)
                scales.index_copy_(0, slots, scale)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        out = decode_attention(q, self.k_cache, self.v_cache, meta.decode_lens, meta.decode_blocks, meta.decode_start,
                               meta.block_size, self.scale, self.softcap, self.window, self.k_scale, self.v_scale)
        if out is not None:  # the native kernel reads the cache in place (CPU, float32), dequantizing as it reads
            return out
        # Fold each KV head's query group into the query-length axis: [D, kv_heads, group, head_dim],
        # so keys are read once per KV head instead of being repeated for every query head.
        batch, group = q.shape[0], self.num_heads // self.num_kv_heads
        qg = q.view(batch, self.num_kv_heads, group, self.head_dim)
        blocks, start, width = meta.decode_blocks, meta.decode_start, meta.decode_width
        keys = self._context("k", blocks, start, batch, width, meta, q.dtype).transpose(1, 2)
        values = self._context("v", blocks, start, batch, width, meta, q.dtype).transpose(1, 2)
        out = attend(qg, keys, values, meta.decode_mask(self.window), self.scale, self.softcap)
        return out.reshape(batch, self.num_heads, self.head_dim)

    def _prefill(self, q, k, v, piece: PrefillSlice, index: int, meta: AttentionMetadata) -> torch.Tensor:
        # The native kernel: a fresh prompt's own K/V as they are, or the float32 cache in place
        if not piece.reads_cache:
            out = causal_attention(q, k.contiguous(), v.contiguous(), piece.length, None, 0, meta.block_size,
                                   self.scale, self.softcap, self.window)
        elif self.k_scale is None:
            out = causal_attention(q, self.k_cache, self.v_cache, piece.context_len, piece.context_blocks,
                                   piece.context_start, meta.block_size, self.scale, self.softcap, self.window)
        else:
            out = None
        if out is not None:
            return out
        if not piece.reads_cache:  # a fresh prompt: attend its own K/V directly, no cache read
            keys, values = k, v
            mask = None if self.window is None else meta.prefill_mask(index, self.window, q.device)
        else:
            blocks, start, width = piece.context_blocks, piece.context_start, piece.context_len
            keys = self._context("k", blocks, start, 1, width, meta, q.dtype)[0]
            values = self._context("v", blocks, start, 1, width, meta, q.dtype)[0]
            mask = meta.prefill_mask(index, self.window, q.device)
        out = attend(
            q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
            mask, self.scale, self.softcap, causal=True,
        )
        return out[0].transpose(0, 1)

    def _context(self, name: str, blocks, start: int, batch: int, width: int, meta: AttentionMetadata, dtype):
        """[batch, width, kv_heads, head_dim] keys (name "k") or values ("v") in `dtype`: read as they are
        cached, and for a quantized cache dequantized with the scales read the same way."""
        cache, scales = (self.k_cache, self.k_scale) if name == "k" else (self.v_cache, self.v_scale)
        values = self._read(cache, name, blocks, start, batch, width, meta)
        if scales is None:
            return values.to(dtype)
        return kv_cache.dequantize(values, self._read(scales, name + "_scale", blocks, start, batch, width, meta),
                                   dtype)

    @staticmethod
    def _read(cache, name: str, blocks, start: int, batch: int, width: int, meta: AttentionMetadata):
        """[batch, width, *cache.shape[1:]] contexts: a slice of the cache from slot `start` (batch 1) when
        `blocks` is None, else one index_select of whole blocks (block-sized memcpys) into a reused buffer,
        trimmed to `width` keys (a view: the keys past a context's end are masked as before)."""
        if blocks is None:
            return cache[start : start + width].unsqueeze(0)
        rows = cache.view(-1, meta.block_size * math.prod(cache.shape[1:]))  # [num_blocks, one block]
        out = torch.index_select(rows, 0, blocks, out=meta.gather_buffer(name, blocks.shape[0], rows))
        return out.view(batch, -1, *cache.shape[1:])[:, :width]
