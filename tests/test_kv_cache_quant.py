"""--kv-cache-dtype int8 (ember.layers.kv_cache, docs/kv-cache.md): attention over the int8 cache equals float
attention over the dequantized cache (native kernel on both ISA builds, torch path; decode and prefill chunks on
scattered blocks, GQA); a tiny model's greedy output and teacher-forced log-probabilities stay those of the
float cache; blocks are freed after aborts; the cache and the estimators are half a 16-bit cache's size."""

from __future__ import annotations

import random
import types
from collections import OrderedDict

import pytest
import torch

from ember.bench import estimates
from ember.cli.main import main
from ember.config import ModelConfig
from ember.engine.block_manager import BlockManager
from ember.engine.engine import EngineArgs
from ember.engine.model_runner import ModelRunner
from ember.engine.scheduler import ScheduledChunk
from ember.errors import InvalidParameter
from ember.kernels import native
from ember.kernels.attention import decode_attention
from ember.layers import kv_cache
from ember.layers.attention import Attention, attend
from ember.llm import LLM
from ember.sampling_params import SamplingParams
from ember.store.memory import (
    KV_CACHE_DTYPES,
    KV_CACHE_QUANT,
    estimate_memory,
    kv_bytes_per_token,
    model_config,
)
from tests.test_kernels import ISAS, needs_native
from tests.test_paged_attention import _sequence, _slot_gather
from tests.tiny_models import build_tiny_model, copy_tokenizer

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 32  # GQA: 4 query heads per KV head


def _setup(block_size: int, num_blocks: int = 48):
    """An attention layer over a random int8 cache (every slot distinct) on shuffled blocks."""
    config = ModelConfig("llama", 320, 64, 128, 1, HEADS, KV_HEADS, HEAD_DIM, sliding_windows=[None])
    attn = Attention(config, 0)
    model = types.SimpleNamespace(model=types.SimpleNamespace(layers=[types.SimpleNamespace(self_attn=attn)]))
    runner = ModelRunner(model, config, torch.device("cpu"), torch.float32, block_size, num_blocks, "int8")
    gen = torch.Generator().manual_seed(block_size)
    for cache, scales in ((runner.k_cache, runner.k_scale), (runner.v_cache, runner.v_scale)):
        cache.copy_(torch.randint(-127, 128, cache.shape, generator=gen, dtype=torch.int8))
        scales.copy_(torch.rand(scales.shape, generator=gen) * 0.05 + 0.001)
    blocks = BlockManager(num_blocks, block_size)
    ids = list(blocks.free)
    random.Random(block_size).shuffle(ids)
    blocks.free = OrderedDict((i, None) for i in ids)
    return attn, runner, blocks


def _dequantized_context(attn, seq, block_size: int, count: int, width: int):
    """[width, kv_heads, head_dim] float keys and values of `seq`'s first `count` tokens (the float reference)."""
    k = kv_cache.dequantize(_slot_gather(attn.k_cache, seq.block_table, block_size, count, width),
                            _slot_gather(attn.k_scale, seq.block_table, block_size, count, width), torch.float32)
    v = kv_cache.dequantize(_slot_gather(attn.v_cache, seq.block_table, block_size, count, width),
                            _slot_gather(attn.v_scale, seq.block_table, block_size, count, width), torch.float32)
    return k, v


@pytest.fixture(params=["torch", *ISAS])
def path(request, monkeypatch):
    """The torch path, or the native kernel built for one ISA (EMBER_ISA=avx2 on an AVX-512 host too)."""
    if request.param == "torch":
        monkeypatch.setenv("EMBER_NATIVE_KERNELS", "0")
    else:
        if not ISAS or native.compiler() is None:
            pytest.skip("native kernels need x86-64 AVX2 and a C compiler")
        monkeypatch.setenv("EMBER_ISA", request.param)
        assert native.isa() == request.param and native.library() is not None
    return request.param


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("lens", [[1], [37], [5, 17, 33, 64]])
def test_int8_decode_equals_float_attention_over_the_dequantized_cache(path, block_size, lens):
    attn, runner, blocks = _setup(block_size)
    seqs = [_sequence(blocks, n, n - 1) for n in lens]
    meta = runner._build([ScheduledChunk(s, 1) for s in seqs])[2]
    q = torch.randn(len(lens), HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    expected = []
    for i, seq in enumerate(seqs):
        k, v = _dequantized_context(attn, seq, block_size, lens[i], lens[i])
        out = attend(q[i].view(KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)[None], k.transpose(0, 1)[None],
                     v.transpose(0, 1)[None], None, attn.scale, None)
        expected.append(out.reshape(HEADS, HEAD_DIM))
    with torch.inference_mode():
        got = attn._decode(q, meta)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=2e-6)
    native_out = decode_attention(q, attn.k_cache, attn.v_cache, meta.decode_lens, meta.decode_blocks,
                                  meta.decode_start, block_size, attn.scale, None, None, attn.k_scale, attn.v_scale)
    assert (native_out is None) == (path == "torch"), "the native kernel reads the int8 cache itself"


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize(("length", "cached"), [(30, 11), (50, 16)])
def test_int8_prefill_chunk_equals_float_attention_over_the_dequantized_cache(block_size, length, cached):
    attn, runner, blocks = _setup(block_size)
    seq = _sequence(blocks, length, cached)
    new = length - cached
    meta = runner._build([ScheduledChunk(seq, new)])[2]
    q = torch.randn(new, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(2))
    k, v = _dequantized_context(attn, seq, block_size, length, length)
    expected = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                      meta.prefill_mask(0, None, q.device), attn.scale, None, causal=True)[0].transpose(0, 1)
    with torch.inference_mode():
        got = attn._prefill(q, k[cached:], v[cached:], meta.prefills[0], 0, meta)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)


def test_quantize_per_token_per_head():
    x = torch.randn(7, KV_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(3)) * torch.tensor([1.0, 40.0])[:,
                                                                                                        None]
    x[2, 1] = 0.0  # an all-zero row: scale 0, dequantizes to zeros
    x[5, 0] *= 1e9  # beyond float16's range times 127: the scale saturates at float16's largest value
    x[6, 0] *= 1e-9  # a scale below float16's smallest subnormal: 0, the row (all below 1e-8) dequantizes to zeros
    q, scale = kv_cache.quantize(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (7, KV_HEADS)
    assert torch.equal(scale[:5], (x[:5].abs().amax(-1) / 127).half())
    assert scale[5, 0] == torch.finfo(torch.float16).max and scale[6, 0] == 0 and scale.isfinite().all()
    rows = (scale > 0) & (torch.arange(7) != 5)[:, None]
    assert q.abs().amax(-1)[rows].eq(127).all()  # each row's extreme maps to ±127 (the scale's rounding included)
    err = (kv_cache.dequantize(q, scale, torch.float32) - x).abs()
    assert (err[rows] <= scale[rows].float()[..., None] / 2 * (1 + 1e-6)).all()
    assert kv_cache.dequantize(q, scale, torch.float32)[2, 1].eq(0).all()
    assert err[6, 0].max() < 1e-8


def test_forward_writes_quantized_rows_into_the_slots():
    attn, runner, blocks = _setup(4)
    seq = _sequence(blocks, 9, 0)
    slots = runner._build([ScheduledChunk(seq, 9)])[2].slot_mapping
    k = torch.randn(9, KV_HEADS, HEAD_DIM)
    v = torch.randn(9, KV_HEADS, HEAD_DIM)
    attn._write(k, v, slots)
    for new, cache, scales in ((k, attn.k_cache, attn.k_scale), (v, attn.v_cache, attn.v_scale)):
        values, scale = kv_cache.quantize(new)
        assert torch.equal(cache[slots], values) and torch.equal(scales[slots], scale)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, testdata):
    directory = build_tiny_model("llama", tmp_path_factory.mktemp("kvq-llama"))
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", directory)
    return directory


def _llm(directory, kv_cache_dtype: str, **args) -> LLM:
    return LLM(directory and str(directory), dtype="float32", device="cpu", kv_cache_dtype=kv_cache_dtype, block_size=4,
               max_batched_tokens=8, **args)


TEXTS = ["The history of the Roman Empire begins with", "Once upon a time, in a small village by the sea,",
         "To make a good cup of coffee, you should", "Photosynthesis is the process by which plants"]
MARGIN = 0.05  # a greedy choice closer than this (in log-probability) may flip: 3x the largest delta measured


@pytest.mark.parametrize("native_kernel", [True, False], ids=["native", "torch"])
def test_default_model_int8_cache_keeps_greedy_tokens_and_logprobs(native_kernel, monkeypatch):
    """The embedded model (trained weights) on real text, batched, chunked prefill (8-token steps, later
    chunks reading the cache) and decode over 4-token blocks. Teacher-forced prompt log-probabilities move by
    little; the greedy tokens equal the float32 cache's up to the first step whose top two choices are within
    MARGIN, where int8's pick is one of those two."""
    if not native_kernel:
        monkeypatch.setenv("EMBER_NATIVE_KERNELS", "0")
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, prompt_logprobs=0, logprobs=2)
    got = _llm(None, "int8").generate(TEXTS, params)
    ref = _llm(None, "auto").generate(TEXTS, params)  # after int8: the layers' scales must be dropped
    deltas = [abs(a.logprob - b.logprob) for r, g in zip(ref, got, strict=True)
              for a, b in zip(r.prompt_logprobs[1:], g.prompt_logprobs[1:], strict=True)]
    assert len(deltas) > 30 and max(deltas) < MARGIN / 2 and sorted(deltas)[len(deltas) // 2] < 0.01
    compared = 0
    for r, g in zip(ref, got, strict=True):
        close = [i for i, lp in enumerate(r.logprobs) if lp.top[0][1] - lp.top[1][1] < MARGIN]
        upto = close[0] if close else len(r.token_ids)
        assert g.token_ids[:upto] == r.token_ids[:upto]
        if close:
            assert g.token_ids[upto] in {t for t, _ in r.logprobs[upto].top}
        compared += upto
    assert compared >= 48, "too few decisive greedy steps to compare"


def test_blocks_free_to_zero_after_aborts(tiny_dir):
    llm = _llm(tiny_dir, "int8")
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"r{i}", [1] + [(7 * i + 13 * j) % 300 + 3 for j in range(20 + 7 * i)], params)
    for _ in range(4):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    for i in range(4):
        engine.abort(f"r{i}")
    assert engine.block_manager.num_used_blocks == 0
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_cache_bytes_and_blocks_in_a_fixed_kv_memory(tiny_dir):
    """The allocated int8 cache is what kv_bytes_per_token says (1 byte a value + a float16 scale per head):
    a fixed --kv-memory holds (head_dim * 2 bytes) / (head_dim + 2) times the blocks of a bfloat16 cache."""
    budget = 2**20
    caches = {}
    for dtype, kv in (("bfloat16", "auto"), ("float32", "auto"), ("float32", "int8")):
        engine = LLM(str(tiny_dir), dtype=dtype, device="cpu", kv_memory=budget, kv_cache_dtype=kv).engine
        config = engine.loaded.config
        per_token = engine.runner.kv_cache_bytes / (engine.num_blocks * engine.args.block_size)
        assert per_token == kv_bytes_per_token(config, engine.loaded.dtype.itemsize, kv)
        caches[dtype, kv] = engine.num_blocks, per_token
    d = config.head_dim
    assert caches["float32", "int8"][1] == 2 * config.num_layers * config.num_kv_heads * (d + 2)
    assert caches["float32", "int8"][1] / caches["bfloat16", "auto"][1] == (d + 2) / (2 * d)
    assert caches["float32", "int8"][0] >= caches["bfloat16", "auto"][0] * 2 * d // (d + 2)


def test_estimators_count_the_quantized_cache(tiny_dir):
    auto = estimate_memory(tiny_dir, 1024, "float32", "cpu")
    int8 = estimate_memory(tiny_dir, 1024, "float32", "cpu", kv_cache_dtype="int8")
    config = model_config(tiny_dir)
    assert int8.weights_bytes == auto.weights_bytes
    assert int8.kv_bytes == 1024 * 2 * config.num_layers * config.num_kv_heads * (config.head_dim + 2)
    option = estimates.option(config, "Q4_K_M", 1024, kv_cache_dtype="int8")
    assert option.kv_bytes == int8.kv_bytes and option.kv_cache_dtype == "int8"
    assert estimates.option(config, "Q4_K_M", 1024).kv_bytes == 1024 * kv_bytes_per_token(config, 2)
    assert set(KV_CACHE_DTYPES) == {"auto", *kv_cache.CACHE_DTYPES} == {"auto", *KV_CACHE_QUANT}


def test_invalid_kv_cache_dtype_is_a_clear_error(capsys):
    with pytest.raises(InvalidParameter, match="kv_cache_dtype.*auto, int8.*'fp4'"):
        EngineArgs(kv_cache_dtype="fp4")
    for command in (["run", "ember-default", "hi"], ["serve"], ["bench", "ember-default"], ["recommend", "ember-default"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--kv-cache-dtype", "fp4"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--kv-cache-dtype: invalid choice: 'fp4'" in err and "Traceback" not in err


@needs_native
def test_kernel_refuses_mismatched_scales():
    """A cache with one scale tensor and not the other, or float32 scales, is refused (the caller keeps the torch path)."""
    cache = torch.zeros(8, KV_HEADS, HEAD_DIM, dtype=torch.int8)
    scales = torch.zeros(8, KV_HEADS, dtype=torch.float16)
    q = torch.randn(1, HEADS, HEAD_DIM)
    wide = scales.float()  # float32 scales are not what the kernel reads
    assert decode_attention(q, cache, cache, torch.tensor([3]), None, 0, 4, 1.0, None, None, wide, wide) is None
    assert decode_attention(q, cache, cache, torch.tensor([3]), None, 0, 4, 1.0, None, None, scales, None) is None
    assert decode_attention(q, cache, cache, torch.tensor([3]), None, 0, 4, 1.0, None, None, scales,
                            scales) is not None
