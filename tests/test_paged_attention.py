"""Reading contexts from the paged KV cache by whole blocks (or as one slice when they are consecutive) gives
bit for bit what the per-slot gather gave, for contexts ending mid-block, uneven batches and sliding windows;
the native decode and prefill kernels (ember.kernels.attention, reading the cache in place) give it to float32
rounding."""

from __future__ import annotations

import random
import types
from collections import OrderedDict

import pytest
import torch

from ember.config import ModelConfig
from ember.engine.block_manager import BlockManager
from ember.engine.model_runner import ModelRunner
from ember.engine.scheduler import ScheduledChunk
from ember.engine.sequence import Sequence
from ember.kernels import native
from ember.layers.attention import Attention, attend
from ember.loader.safetensors import load_safetensors_model
from tests.engine_helpers import greedy_tokens
from tests.tiny_models import build_tiny_model

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def _setup(block_size: int, window: int | None, softcap: float | None, shuffled: bool, num_blocks: int = 48):
    config = ModelConfig("llama", 320, 64, 128, 1, HEADS, KV_HEADS, HEAD_DIM, attn_logit_softcap=softcap,
                         sliding_windows=[window])
    attn = Attention(config, 0)
    model = types.SimpleNamespace(model=types.SimpleNamespace(layers=[types.SimpleNamespace(self_attn=attn)]))
    runner = ModelRunner(model, config, torch.device("cpu"), torch.float32, block_size, num_blocks)
    runner.k_cache.normal_()  # every slot finite but distinct, so a wrong key cannot go unnoticed
    runner.v_cache.normal_()
    blocks = BlockManager(num_blocks, block_size)
    if shuffled:
        ids = list(blocks.free)
        random.Random(block_size).shuffle(ids)
        blocks.free = OrderedDict((i, None) for i in ids)
    return attn, runner, blocks


def _sequence(blocks: BlockManager, length: int, computed: int) -> Sequence:
    seq = Sequence(str(length), [5] * length, None)
    assert blocks.allocate(seq)
    seq.num_computed_tokens = computed
    return seq


def _slot_gather(cache: torch.Tensor, table: list[int], block_size: int, count: int, width: int) -> torch.Tensor:
    """The former read: one index_select of every slot, padded with slot 0 up to `width`."""
    slots = [table[p // block_size] * block_size + p % block_size for p in range(count)] + [0] * (width - count)
    return cache.index_select(0, torch.tensor(slots))


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (6, None), (None, 30.0), (6, 30.0)])
@pytest.mark.parametrize("lens", [[1], [13], [5, 17, 33], [40, 3, 40, 16]])
@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("native_kernel", [False, True], ids=["torch", "native"])
def test_decode_reads_the_same_keys_as_a_slot_gather(block_size, window, softcap, lens, shuffled, native_kernel,
                                                      monkeypatch):
    if native_kernel and native.library() is None:
        pytest.skip("native kernels unavailable here")
    if not native_kernel:
        monkeypatch.setenv("EMBER_NATIVE_KERNELS", "0")
    attn, runner, blocks = _setup(block_size, window, softcap, shuffled)
    seqs = [_sequence(blocks, n, n - 1) for n in lens]
    meta = runner._build([ScheduledChunk(s, 1) for s in seqs])[2]
    if len(lens) == 1 and not shuffled:
        assert meta.decode_blocks is None, "one sequence on consecutive blocks is read as a slice"
    if shuffled and max(lens) > block_size:
        assert meta.decode_blocks is not None
    q = torch.randn(len(lens), HEADS, HEAD_DIM)

    width = max(lens)
    shape = (len(lens), width, KV_HEADS, HEAD_DIM)
    keys = torch.cat([_slot_gather(attn.k_cache, s.block_table, block_size, len(s), width) for s in seqs])
    values = torch.cat([_slot_gather(attn.v_cache, s.block_table, block_size, len(s), width) for s in seqs])
    qg = q.view(len(lens), KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    expected = attend(qg, keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2),
                      meta.decode_mask(window), attn.scale, softcap).reshape(len(lens), HEADS, HEAD_DIM)
    with torch.inference_mode():
        got = attn._decode(q, meta)
        again = attn._decode(q, runner._build([ScheduledChunk(s, 1) for s in seqs])[2])  # reused buffers
    if native_kernel:
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
        assert torch.equal(again, got)
    else:
        assert torch.equal(got, expected)
        assert torch.equal(again, expected)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize(("length", "cached"), [(30, 11), (21, 16), (9, 1)])
@pytest.mark.parametrize("native_kernel", [False, True], ids=["torch", "native"])
def test_cached_prefix_prefill_reads_the_same_keys_as_a_slot_gather(block_size, window, shuffled, length, cached,
                                                                    native_kernel, monkeypatch):
    if native_kernel and native.library() is None:
        pytest.skip("native kernels unavailable here")
    if not native_kernel:
        monkeypatch.setenv("EMBER_NATIVE_KERNELS", "0")
    attn, runner, blocks = _setup(block_size, window, None, shuffled)
    seq = _sequence(blocks, length, cached)
    new = length - cached
    meta = runner._build([ScheduledChunk(seq, new)])[2]
    piece = meta.prefills[0]
    assert piece.reads_cache
    q = torch.randn(new, HEADS, HEAD_DIM)
    k = v = torch.randn(new, KV_HEADS, HEAD_DIM)  # already in the cache: the prefill reads it from there

    keys = _slot_gather(attn.k_cache, seq.block_table, block_size, length, length)
    values = _slot_gather(attn.v_cache, seq.block_table, block_size, length, length)
    expected = attend(q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                      meta.prefill_mask(0, window, q.device), attn.scale, None, causal=True)[0].transpose(0, 1)
    with torch.inference_mode():
        got = attn._prefill(q, k, v, piece, 0, meta)
    if native_kernel:  # causal_attention.c, reading the cache in place through the block table
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_batch_on_scattered_blocks_matches_single_runs(family, tmp_path):
    """Uneven sequences decoding together on shuffled blocks (block reads, padded and masked) produce the
    tokens each produces alone on consecutive blocks (slice reads)."""
    model, config, _ = load_safetensors_model(build_tiny_model(family, tmp_path / family), "float32",
                                              torch.device("cpu"))
    prompts = [[(7 * i + 3 * j) % 300 + 3 for j in range(n)] for i, n in enumerate((3, 14, 9))]
    steps = 20  # past the window (12) and across several 4-token blocks
    expected = [greedy_tokens(model, config, p, steps) for p in prompts]

    blocks = BlockManager(64, 4)
    ids = list(blocks.free)
    random.Random(0).shuffle(ids)
    blocks.free = OrderedDict((i, None) for i in ids)
    runner = ModelRunner(model, config, torch.device("cpu"), torch.float32, 4, 64)
    seqs = [Sequence(str(i), p, None) for i, p in enumerate(prompts)]
    for seq in seqs:
        assert blocks.allocate(seq)
    while any(s.num_output_tokens < steps for s in seqs):
        chunks = [ScheduledChunk(s, min(5, s.num_uncomputed_tokens)) for s in seqs if s.num_output_tokens < steps]
        sampled, logits, _ = runner.run(chunks)
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        for chunk, row in zip(sampled, logits, strict=True):
            chunk.seq.token_ids.append(int(row.argmax()))
            blocks.grow(chunk.seq, len(chunk.seq))
    assert [s.output_token_ids for s in seqs] == expected
