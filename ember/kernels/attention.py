"""Decode attention over the paged KV cache through the native library (see attention.c)."""

from __future__ import annotations

import torch

from ember.kernels.native import library


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor,
                     blocks: torch.Tensor | None, start: int, block_size: int, scale: float,
                     softcap: float | None, window: int | None) -> torch.Tensor | None:
    """softmax(q k^T * scale) v for one query token per sequence: q [D, heads, head_dim], caches
    [slots, kv_heads, head_dim], lens [D] context lengths, blocks [D * max_blocks] block ids (or None: one
    sequence whose context is slots start.. start + lens[0]). float32 on CPU only; None where the kernel does
    not apply (the caller keeps its torch path)."""
    lib = library()
    if (lib is None or q.device.type != "cpu" or q.dtype != torch.float32 or k_cache.dtype != torch.float32
            or v_cache.dtype != torch.float32 or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        return None
    batch, heads, head_dim = q.shape
    q = q.contiguous()
    lens = lens.to(torch.int64).contiguous()
    if blocks is not None:
        blocks = blocks.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    rc = lib.ember_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), batch, heads, k_cache.shape[1],
        head_dim, None if blocks is None else blocks.data_ptr(), 0 if blocks is None else blocks.numel() // batch,
        start, lens.data_ptr(), block_size, scale, softcap or 0.0, window or 0, torch.get_num_threads())
    return None if rc else out
