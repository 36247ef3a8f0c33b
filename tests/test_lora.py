"""LoRA adapters (docs/lora.md): PEFT adapters equal PEFT's merged model, several adapters mix in one batch,
prefix-cache keys keep adapters apart, and bad adapters are refused with a clear error."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from ember.engine.lora import LoraRegistry, LoraSpec
from ember.loader.model import load_model
from tests.engine_helpers import prefill_logits, teacher_forced_agreement
from tests.tiny_models import build_tiny_model, copy_tokenizer

DATA = Path(__file__).parent / "data" / "lora"  # made by scripts/make_lora_testdata.py
GGUF_LORA = DATA / "tiny-llama-lora-f16.gguf"
PROMPT = [3, 17, 99, 250, 7, 64, 128, 5, 42, 200, 11, 301, 77, 8, 150, 33, 90, 12, 4, 260]
# PEFT's names for each family's projections (Phi-3 keeps q/k/v and gate/up fused in its checkpoint).
TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(base_dir, out_dir, seed: int, r: int = 4, alpha: float = 8.0, rslora: bool = False,
                      targets=None):
    """A random PEFT adapter for the model in base_dir (lora_B randomized: PEFT initialises it to zero);
    returns PEFT's merged model for reference."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ALL_TARGETS, use_rslora=rslora,
                             lora_dropout=0.0)
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    wrapped.save_pretrained(out_dir)
    return wrapped.merge_and_unload().eval()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, testdata):
    directory = build_tiny_model("llama", tmp_path_factory.mktemp("base") / "tiny-llama")
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", directory)
    return directory


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma2"])
def test_peft_adapter_equals_merged_model(family, tmp_path, testdata):
    base = build_tiny_model(family, tmp_path / "base")
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", base)
    rslora = family == "qwen2"
    merged = make_peft_adapter(base, tmp_path / "adapter", seed=1, rslora=rslora, targets=TARGETS.get(family))
    with torch.no_grad():
        expected = merged(torch.tensor([PROMPT])).logits[0]
    loaded = load_model(base, dtype="float32", device="cpu")
    registry = LoraRegistry(loaded)
    adapter = registry.load(LoraSpec("a", str(tmp_path / "adapter")))
    got = prefill_logits(loaded.model, loaded.config, PROMPT, lora=registry.layers, lora_slot=adapter.slot)
    assert (got - expected).abs().max().item() <= 1e-4
    # The base model is unchanged for sequences without the adapter (slot 0).
    base_logits = prefill_logits(loaded.model, loaded.config, PROMPT, lora=registry.layers)
    assert (base_logits - expected).abs().max().item() > 1e-2


def _with_adapter(path, spec_path, name="a"):
    loaded = load_model(path, dtype="float32", device="cpu")
    registry = LoraRegistry(loaded)
    adapter = registry.load(LoraSpec(name, str(spec_path)))
    return loaded, registry, adapter


@pytest.mark.parametrize("base", ["tiny-llama-bf16.gguf", "tiny-llama-Q4_K_M.gguf"])
def test_gguf_lora_on_gguf_base_agrees_with_llamacpp(base, testdata):
    """llama.cpp's own converter made the adapter; llama.cpp's server ran it (tests/data/lora/refs.json)."""
    cases = json.loads((DATA / "refs.json").read_text())[base]
    loaded, registry, adapter = _with_adapter(testdata / "gguf" / base, GGUF_LORA)
    assert adapter.weights.format == "gguf" and adapter.weights.rank == 8
    hits, total, deltas = teacher_forced_agreement(loaded.model, loaded.config, cases, lora=registry.layers,
                                                   lora_slot=adapter.slot)
    assert total > 20, "too few confident steps to judge"
    assert hits / total >= 0.98, (hits, total)
    assert statistics.median(deltas) <= 0.06 and deltas[int(0.95 * (len(deltas) - 1))] <= 0.2
    # Without the adapter, the same model disagrees with llama.cpp's adapted outputs: the adapter is what matched.
    base_hits, base_total, _ = teacher_forced_agreement(loaded.model, loaded.config, cases, lora=registry.layers)
    assert base_hits / base_total < 0.5


def test_gguf_lora_equals_its_peft_source(testdata):
    """The converted adapter on the bf16 GGUF base and the PEFT adapter on the transformers base give the same
    logits (the GGUF's Q/K rows are permuted for llama.cpp's rope; ember puts lora_b's back as the base's), as
    close as the two bases themselves are (the GGUF's bf16 matmul kernel rounds its input to bf16)."""
    gguf, gguf_registry, gguf_adapter = _with_adapter(testdata / "gguf" / "tiny-llama-bf16.gguf", GGUF_LORA)
    hf, hf_registry, hf_adapter = _with_adapter(testdata / "gguf" / "tiny-llama-hf", DATA / "peft")
    prompt = [1, *PROMPT]
    got = prefill_logits(gguf.model, gguf.config, prompt, lora=gguf_registry.layers, lora_slot=gguf_adapter.slot)
    expected = prefill_logits(hf.model, hf.config, prompt, lora=hf_registry.layers, lora_slot=hf_adapter.slot)
    bases_apart = (prefill_logits(gguf.model, gguf.config, prompt, lora=gguf_registry.layers)
                   - prefill_logits(hf.model, hf.config, prompt, lora=hf_registry.layers)).abs().max().item()
    assert (got - expected).abs().max().item() <= 2 * bases_apart + 1e-3
