"""Attention over the paged KV cache through the native library: decode (attention.c) and causal prefill
(causal_attention.c)."""

from __future__ import annotations

import torch

from ember.kernels.native import library


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor,
                     blocks: torch.Tensor | None, start: int, block_size: int, scale: float,
                     softcap: float | None, window: int | None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """softmax(q k^T * scale) v for one query token per sequence: q [D, heads, head_dim], caches
    [slots, kv_heads, head_dim], lens [D] context lengths, blocks [D * max_blocks] block ids (or None: one
    sequence whose context is slots start.. start + lens[0]). The caches are float32, or int8 with float16
    scales k_scale/v_scale [slots, kv_heads] (ember.layers.kv_cache), dequantized as the kernel reads them.
    float32 queries on CPU only; None where the kernel does not apply (the caller keeps its torch path)."""
    lib = library()
    cache_dtype = torch.float32 if k_scale is None else torch.int8
    caches = (k_cache, v_cache) if k_scale is None else (k_cache, v_cache, k_scale, v_scale)
    if (lib is None or q.device.type != "cpu" or q.dtype != torch.float32 or k_cache.dtype != cache_dtype
            or v_cache.dtype != cache_dtype or (k_scale is None) != (v_scale is None)
            or not all(t.is_contiguous() for t in caches)
            or (k_scale is not None and (k_scale.dtype != torch.float16 or v_scale.dtype != torch.float16))):
        return None
    batch, heads, head_dim = q.shape
    q = q.contiguous()
    lens = lens.to(torch.int64).contiguous()
    if blocks is not None:
        blocks = blocks.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    rc = lib.ember_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), None if k_scale is None else k_scale.data_ptr(),
        None if v_scale is None else v_scale.data_ptr(), out.data_ptr(), batch, heads, k_cache.shape[1],
        head_dim, None if blocks is None else blocks.data_ptr(), 0 if blocks is None else blocks.numel() // batch,
        start, lens.data_ptr(), block_size, scale, softcap or 0.0, window or 0, torch.get_num_threads())
    return None if rc else out


def causal_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_len: int,
                     blocks: torch.Tensor | None, start: int, block_size: int, scale: float,
                     softcap: float | None, window: int | None) -> torch.Tensor | None:
    """softmax(q k^T * scale) v for the last n = q.shape[0] positions of one sequence, each over the keys up to
    its own position (causal_attention.c): q [n, heads, head_dim]; the context's first `context_len` tokens in
    caches [slots, kv_heads, head_dim], at the slots of `blocks` (its block table) or, when None, slots
    start .. start + context_len. float32 on CPU, no soft-capping; None where the kernel does not apply (the
    caller keeps its torch path)."""
    lib = library()
    if (lib is None or softcap is not None or q.device.type != "cpu" or q.dtype != torch.float32
            or k_cache.dtype != torch.float32 or v_cache.dtype != torch.float32
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        return None
    n, heads, head_dim = q.shape
    q = q.contiguous()
    if blocks is not None:
        blocks = blocks.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    rc = lib.ember_causal_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), n, context_len, heads,
        k_cache.shape[1], head_dim, None if blocks is None else blocks.data_ptr(), start, block_size, scale,
        window or 0, torch.get_num_threads())
    return None if rc else out
