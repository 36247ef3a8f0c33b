"""The native causal attention kernel (ember/kernels/causal_attention.c: prefill chunks over the paged cache)
against softmax attention computed in float64, on both ISA builds: contiguous and shuffled block tables,
sliding windows, grouped-query shapes, head sizes that leave partial vector groups, chunks that start mid-
context, and a single row."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import native
from ember.kernels.attention import causal_attention

ISAS = [name for name in ("avx2", "avx512") if native.ISA_REQUIRES[name] <= native.cpu_flags()]
pytestmark = pytest.mark.skipif(not ISAS or native.compiler() is None,
                                reason="native kernels need x86-64 AVX2 and a C compiler")


def reference(q, keys, values, context_len, window, scale):
    n, heads = q.shape[:2]
    group = heads // keys.shape[1]
    pos = torch.arange(context_len - n, context_len)[:, None]
    key_pos = torch.arange(context_len)[None, :]
    mask = key_pos <= pos
    if window:
        mask &= key_pos > pos - window
    k, v = keys.repeat_interleave(group, 1).double(), values.repeat_interleave(group, 1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("hqk,khd->qhd", probs, v)


CASES = [  # n, context, heads, kv heads, head_dim, block size, window, paged
    (512, 512, 32, 4, 64, 16, None, False),  # a whole prompt, TinyLlama's shape
    (37, 300, 8, 2, 128, 16, None, True),  # a chunk after a cached prefix
    (5, 77, 32, 4, 64, 16, None, True),  # speculative verification's shape
    (1, 40, 4, 4, 64, 8, None, True),
    (100, 250, 12, 4, 80, 16, 64, True),  # head_dim 80: a partial group of value vectors
    (64, 64, 6, 2, 96, 32, 20, False),
    (13, 1000, 16, 1, 64, 16, 300, True),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}-ctx{}-h{}-kv{}-d{}-bs{}-w{}-{}".format(*c))
def test_matches_float64_softmax_attention(isa, case, monkeypatch):
    monkeypatch.setenv("EMBER_ISA", isa)
    n, context_len, heads, kv_heads, head_dim, block_size, window, paged = case
    g = torch.Generator().manual_seed(n * 7 + context_len)
    slots = 2048
    k_cache = torch.randn(slots, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(slots, kv_heads, head_dim, generator=g)
    q = torch.randn(n, heads, head_dim, generator=g) * 2  # sharp enough that a wrong key shows
    if paged:
        blocks = torch.randperm(slots // block_size, generator=g)[: -(-context_len // block_size)]
        slot_ids = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:context_len]
        start = 0
    else:
        blocks, start = None, 7
        slot_ids = torch.arange(start, start + context_len)
    scale = head_dim**-0.5
    out = causal_attention(q, k_cache, v_cache, context_len, blocks, start, block_size, scale, None, window)
    assert out is not None
    expected = reference(q, k_cache[slot_ids], v_cache[slot_ids], context_len, window, scale)
    assert ((out.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_refuses_what_it_does_not_take():
    """Soft-capping, other dtypes and head sizes off the vector width stay on torch's path (None)."""
    q = torch.randn(4, 4, 64)
    cache = torch.randn(16, 2, 64)
    assert causal_attention(q, cache, cache, 4, None, 0, 16, 0.1, 30.0, None) is None
    assert causal_attention(q.double(), cache, cache, 4, None, 0, 16, 0.1, None, None) is None
    odd = torch.randn(4, 4, 12)
    assert causal_attention(odd, torch.randn(16, 2, 12), torch.randn(16, 2, 12), 4, None, 0, 16, 0.1, None,
                            None) is None
