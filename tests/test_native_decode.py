"""The native decode stack (ember.models.native_decode, ember/kernels/decode_layers.c) computes what the
module-by-module path computes: same logits on decode-only steps of several sequences at different positions
with scattered block tables, for each family it covers, GGML types, float32 and int8 caches, both ISA builds;
and the cases it does not cover fall back to the module path."""

from __future__ import annotations

import pytest
import torch

from ember.engine.block_manager import BlockManager
from ember.engine.model_runner import ModelRunner
from ember.engine.scheduler import ScheduledChunk
from ember.engine.sequence import Sequence
from ember.kernels.native import NATIVE_TYPES
from ember.layers.lora import attach_lora
from ember.loader.model import load_model
from ember.quant.embedding import QuantEmbedding
from ember.quant.ggml import FLOAT_TYPES, GGMLType, dequantize, random_rows
from ember.quant.linear import QuantLinear
from tests.test_kernels import ISAS, needs_native
from tests.tiny_models import build_tiny_model, copy_tokenizer

PROMPTS = [[5, 17, 99, 3, 250, 7], [11, 42], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]  # distinct: no shared blocks
PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("EMBER_ISA", request.param)
    return request.param


def quantized_tiny(family: str, ggml_type: GGMLType, tmp_path, testdata):
    """A tiny model of `family` whose projections are random `ggml_type` rows on the native kernels (biases kept),
    fused as the GGUF loader fuses them."""
    directory = build_tiny_model(family, tmp_path / family)
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", directory)
    loaded = load_model(directory, dtype="float32", device="cpu")
    for seed, layer in enumerate(loaded.model.model.layers):
        for i, (block, name) in enumerate(PROJECTIONS):
            old = getattr(getattr(layer, block), name)
            if ggml_type == GGMLType.BF16:  # the checkpoint's own weights, rounded
                rows = old.weight.detach().to(torch.bfloat16).contiguous().view(torch.uint8)
            else:
                rows = random_rows(ggml_type, old.out_features, old.in_features, seed=10 * seed + i)
            new = QuantLinear(rows, ggml_type, (old.out_features, old.in_features), torch.float32, "cpu")
            new.bias = old.bias
            setattr(getattr(layer, block), name, new)
    loaded.model.fuse_projections()
    return loaded


def decode_logits(loaded, native: bool, monkeypatch, steps: int = 6, kv_cache_dtype: str = "auto") -> list:
    """Prefill PROMPTS one by one, then decode them together: each decode step's logits [3, vocab]."""
    monkeypatch.setenv("EMBER_NATIVE_DECODE", "1" if native else "0")
    runner = ModelRunner(loaded.model, loaded.config, torch.device("cpu"), torch.float32, block_size=4,
                         num_blocks=64, kv_cache_dtype=kv_cache_dtype)
    assert (runner.native_layers() is not None) == native
    blocks = BlockManager(64, 4)
    seqs = [Sequence(f"s{i}", list(prompt), None) for i, prompt in enumerate(PROMPTS)]
    for seq in seqs:
        blocks.allocate(seq)
        _, logits, _ = runner.run([ScheduledChunk(seq, len(seq))])
        seq.num_computed_tokens = len(seq)
        seq.token_ids.append(int(logits[0].argmax()))
    out = []
    for _ in range(steps):
        for seq in seqs:
            blocks.grow(seq, len(seq))
        _, logits, _ = runner.run([ScheduledChunk(seq, 1) for seq in seqs])
        out.append(logits)
        for seq, row in zip(seqs, logits, strict=True):
            seq.num_computed_tokens += 1
            seq.token_ids.append(int(row.argmax()))
    # the decodes grew in turn: their block tables are interleaved, not consecutive
    assert any(b - a != 1 for seq in seqs for a, b in zip(seq.block_table[:-1], seq.block_table[1:], strict=True))
    return out


@needs_native
@pytest.mark.parametrize("family,ggml_type", [("llama", GGMLType.Q8_0), ("llama-rope-llama3", GGMLType.Q4_0),
                                              ("mistral", GGMLType.Q8_0), ("qwen2", GGMLType.BF16),
                                              ("phi3", GGMLType.Q4_1)])
def test_native_stack_equals_module_path(isa, family, ggml_type, tmp_path, testdata, monkeypatch):
    loaded = quantized_tiny(family, ggml_type, tmp_path, testdata)
    reference = decode_logits(loaded, False, monkeypatch)
    native = decode_logits(loaded, True, monkeypatch)
    for ref, got in zip(reference, native, strict=True):
        assert torch.equal(got, ref)  # the same kernels in the same order: the same bits


@needs_native
def test_native_stack_with_int8_cache(isa, tmp_path, testdata, monkeypatch):
    loaded = quantized_tiny("llama", GGMLType.Q8_0, tmp_path, testdata)
    reference = decode_logits(loaded, False, monkeypatch, kv_cache_dtype="int8")
    native = decode_logits(loaded, True, monkeypatch, kv_cache_dtype="int8")
    for ref, got in zip(reference, native, strict=True):
        assert torch.equal(got, ref)  # the same kernels in the same order: the same bits


@needs_native
@pytest.mark.parametrize("name", ["tiny-llama-Q4_K_M.gguf", "tiny-llama-Q6_K.gguf", "tiny-llama-bf16.gguf"])
def test_native_stack_on_gguf_files(isa, name, testdata, monkeypatch):
    """llama.cpp's files (K-quants, Q6_K, bf16; GGUF's permuted Q/K rows): the same logits either way."""
    loaded = load_model(testdata / "gguf" / name, dtype="float32", device="cpu")
    reference = decode_logits(loaded, False, monkeypatch, steps=4)
    native = decode_logits(loaded, True, monkeypatch, steps=4)
    for ref, got in zip(reference, native, strict=True):
        assert torch.equal(got, ref)  # the same kernels in the same order: the same bits


@needs_native
@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_layers_it_does_not_cover_keep_the_module_path(family, tmp_path, testdata):
    """Qwen3's q/k norms and Gemma 2's sandwich norms (gelu MLP) are not in the native layer."""
    loaded = quantized_tiny(family, GGMLType.Q8_0, tmp_path, testdata)
    runner = ModelRunner(loaded.model, loaded.config, torch.device("cpu"), torch.float32, 4, 16)
    assert runner.native_layers() is None


@needs_native
def test_prefill_steps_and_lora_keep_the_module_path(tmp_path, testdata):
    loaded = quantized_tiny("llama", GGMLType.Q8_0, tmp_path, testdata)
    runner = ModelRunner(loaded.model, loaded.config, torch.device("cpu"), torch.float32, 4, 16)
    blocks = BlockManager(16, 4)
    seq = Sequence("s", [1, 2, 3], None)
    blocks.allocate(seq)
    chunk = ScheduledChunk(seq, 3)
    assert runner._build([chunk])[2].native_layers is None  # a prefill
    seq.num_computed_tokens = 2
    assert runner._build([ScheduledChunk(seq, 1)])[2].native_layers is not None  # a decode
    runner.lora = attach_lora(loaded.model)  # adapters wrap the projections: the stack would skip them
    assert runner._build([ScheduledChunk(seq, 1)])[2].native_layers is None


@needs_native
@pytest.mark.parametrize("ggml_type", sorted(t for t in NATIVE_TYPES if t not in FLOAT_TYPES), ids=lambda t: t.name)
def test_quantized_embedding_lookup_equals_dequantize(isa, ggml_type):
    """The native row lookup gives gguf-order dequantize()'s bits; out-of-range ids still raise."""
    rows = random_rows(ggml_type, 50, 512, seed=1)
    table = QuantEmbedding(rows, ggml_type, (50, 512), torch.float32, torch.device("cpu"))
    assert table._lib is not None
    ids = torch.tensor([3, 49, 0, 3])
    assert torch.equal(table(ids), dequantize(rows[ids], ggml_type, (4, 512)))
    with pytest.raises(IndexError):
        table(torch.tensor([1, 50]))
