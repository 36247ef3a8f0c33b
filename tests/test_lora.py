"""LoRA adapters (docs/lora.md): PEFT adapters equal PEFT's merged model, several adapters mix in one batch,
prefix-cache keys keep adapters apart, and bad adapters are refused with a clear error."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ember.engine.lora import LoraRegistry
from ember.engine.lora_spec import LoraSpec
from ember.errors import LoraError
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
                      targets=None, bf16_values: bool = False):
    """A random PEFT adapter for the model in base_dir (lora_B randomized: PEFT initialises it to zero);
    returns PEFT's merged model for reference. `bf16_values`: every A and B value is a bfloat16 one (stored as
    float32), so an adapter held in bfloat16 loses nothing (with a power-of-two scale folded into B)."""
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
                if bf16_values:
                    p.copy_(p.bfloat16())
    wrapped.save_pretrained(out_dir)
    return wrapped.merge_and_unload().eval()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, testdata):
    directory = build_tiny_model("llama", tmp_path_factory.mktemp("base") / "tiny-llama")
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", directory)
    return directory


@pytest.mark.parametrize(("family", "lora_dtype"), [("llama", "float32"), ("qwen2", "float32"), ("phi3", "float32"),
                                                    ("gemma2", "float32"), ("llama", "bfloat16"),
                                                    ("phi3", "bfloat16")])
def test_peft_adapter_equals_merged_model(family, lora_dtype, tmp_path, testdata):
    """fp32 logits within 1e-4 of PEFT's merged model. Adapters held in bfloat16 (the default on CPUs with
    AVX512-BF16: ember.loader.dtypes.resolve_lora_dtype_name) are checked with bf16-valued adapters, which that
    dtype holds exactly: what is compared is the bf16 kernel path, not the rounding."""
    base = build_tiny_model(family, tmp_path / "base")
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", base)
    rslora = family == "qwen2"  # scale alpha / sqrt(r) = 4, as alpha / r = 2: powers of two, exact in bf16
    merged = make_peft_adapter(base, tmp_path / "adapter", seed=1, rslora=rslora, targets=TARGETS.get(family),
                               bf16_values=lora_dtype == "bfloat16")
    with torch.no_grad():
        expected = merged(torch.tensor([PROMPT])).logits[0]
    loaded = load_model(base, dtype="float32", device="cpu")
    registry = LoraRegistry(loaded, lora_dtype)
    adapter = registry.load(LoraSpec("a", str(tmp_path / "adapter")))
    held = [pair for module in registry.layers.modules.values() for pair in module.pairs.values()]
    assert held and all(a.dtype == b.dtype == getattr(torch, lora_dtype) for a, b in held)
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


@pytest.fixture(scope="module")
def four_adapters(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    paths = {}
    for index in range(4):
        # Different ranks and target sets: the batch mixes shapes, and some projections have no adapter.
        targets = ALL_TARGETS if index % 2 == 0 else ["q_proj", "v_proj", "down_proj"]
        make_peft_adapter(tiny_llama, folder / f"a{index}", seed=10 + index, r=2 + 2 * index, targets=targets)
        paths[f"a{index}"] = folder / f"a{index}"
    return paths


@pytest.fixture(scope="module")
def lora_llm(tiny_llama, four_adapters):
    from ember.llm import LLM

    return LLM(str(tiny_llama), dtype="float32", device="cpu", max_num_seqs=16, max_model_len=128,
               lora=[f"{name}={path}" for name, path in four_adapters.items()])


def test_mixed_batch_equals_each_alone(lora_llm):
    """16 requests over 4 adapters and the base model, in one batch, give each request's tokens alone."""
    from ember.sampling_params import SamplingParams

    names = [None, "a0", "a1", "a2", "a3"]
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (int(n),), generator=generator).tolist()
               for n in torch.randint(3, 20, (16,), generator=generator)]
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, lora=names[i % 5],
                             use_prefix_cache=False) for i in range(16)]
    together = [out.token_ids for out in lora_llm.generate(prompts, params)]
    alone = [lora_llm.generate(prompt, p)[0].token_ids for prompt, p in zip(prompts, params, strict=True)]
    assert together == alone
    # The adapters matter: the same prompt under each adapter and the base gives different tokens.
    first = {tuple(lora_llm.generate(prompts[0], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                                     lora=name)[0].token_ids) for name in names}
    assert len(first) == 5


def test_prefix_cache_keys_include_the_adapter(lora_llm):
    from ember.sampling_params import SamplingParams

    prompt = list(range(10, 60))  # several full blocks
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = lora_llm.generate(prompt, greedy, lora="a0")[0]
    again = lora_llm.generate(prompt, greedy, lora="a0")[0]
    assert again.cached_tokens > 0 and again.token_ids == first.token_ids
    for other in (None, "a1"):  # cached under a0: not reused by the base model or another adapter
        out = lora_llm.generate(prompt, greedy, lora=other)[0]
        assert out.cached_tokens == 0
        assert out.token_ids == lora_llm.generate(prompt, replace(greedy, use_prefix_cache=False), lora=other)[0].token_ids


def test_load_unload_at_run_time(lora_llm, four_adapters):
    from ember.errors import InvalidParameter, LoraInUse, LoraNotFound
    from ember.sampling_params import SamplingParams

    engine = lora_llm.engine
    lora_llm.load_lora("again", str(four_adapters["a3"]), scale=0.5)
    engine.add_request("busy", [5, 6, 7], SamplingParams(max_tokens=2, lora="again"))
    with pytest.raises(LoraInUse):  # refused while a request uses it
        lora_llm.unload_lora("again")
    while engine.has_work():
        engine.step()
    lora_llm.unload_lora("again")
    with pytest.raises(InvalidParameter, match="unknown LoRA adapter 'again'"):
        lora_llm.generate([5, 6, 7], SamplingParams(max_tokens=2), lora="again")
    with pytest.raises(LoraNotFound):
        lora_llm.unload_lora("again")
    with pytest.raises(LoraError, match="already loaded"):
        lora_llm.load_lora("a0", str(four_adapters["a0"]))


def test_bad_adapters_are_refused(tmp_path, testdata, four_adapters):
    """A PEFT adapter for another base, a missing path, a non-adapter file and unsupported options: LoraError."""
    loaded = load_model(testdata / "gguf" / "tiny-llama-hf", dtype="float32", device="cpu")
    registry = LoraRegistry(loaded)
    with pytest.raises(LoraError, match="do not fit the base model"):
        registry.load(LoraSpec("x", str(four_adapters["a0"])))
    with pytest.raises(LoraError, match="does not exist"):
        registry.load(LoraSpec("x", str(tmp_path / "missing")))
    with pytest.raises(LoraError, match="not a LoRA adapter GGUF"):
        registry.load(LoraSpec("x", str(testdata / "gguf" / "tiny-llama-Q4_0.gguf")))
    with pytest.raises(LoraError, match="needs adapter_config.json"):
        registry.load(LoraSpec("x", str(tmp_path)))
    bad = tmp_path / "dora"
    bad.mkdir()
    config = json.loads((DATA / "peft" / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    (bad / "adapter_model.safetensors").write_bytes((DATA / "peft" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(LoraError, match="use_dora"):
        registry.load(LoraSpec("x", str(bad)))
    with pytest.raises(LoraError, match="lora_name"):
        registry.load(LoraSpec("bad name!", str(DATA / "peft")))
    assert registry.adapters == {}
