"""The bundled model: small, loads with no argument, chats in ChatML, and runs as transformers runs it."""

from __future__ import annotations

import torch

from ember import LLM, SamplingParams
from ember.store.resolve import DEFAULT_MODEL_DIR


def test_bundled_model_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) <= 50 * 2**20
    assert (DEFAULT_MODEL_DIR.parent / "ember-default-bf16.gguf").stat().st_size <= 50 * 2**20


def test_greedy_tokens_match_transformers():
    import transformers

    llm = LLM(None, dtype="float32")
    assert llm.engine.model_name == "ember-default"
    prompt = llm.render_chat([{"role": "user", "content": "Tell me a fortune."}])
    assert prompt == "<|im_start|>user\nTell me a fortune.<|im_end|>\n<|im_start|>assistant\n"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]

    reference = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32)
    ids = torch.tensor([out.prompt_token_ids])
    expected = reference.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, ids.shape[1]:]
    assert out.token_ids == expected.tolist()


def test_chat_answers_english_and_stops():
    llm = LLM("ember-default")
    answers = llm.chat([{"role": "user", "content": "Cheer me up."}],
                       SamplingParams(temperature=0.7, max_tokens=200, seed=1, n=4))
    assert any(a.finish_reason == "stop" for a in answers)  # it learned to close its turn
    words = " ".join(a.text for a in answers).split()
    common = {"the", "a", "you", "is", "of", "to", "and", "i", "in", "it"}
    assert sum(w.lower().strip(".,!?\"'") in common for w in words) >= len(words) / 10


def test_gguf_export_runs_like_the_checkpoint():
    """ember/assets/ember-default-bf16.gguf (scripts/export_default_gguf.py): same tokens, template, outputs."""
    gguf_llm = LLM(str(DEFAULT_MODEL_DIR.parent / "ember-default-bf16.gguf"), dtype="float32")
    llm = LLM(None, dtype="float32")
    messages = [{"role": "user", "content": "Tell me a fortune."}]
    prompt = llm.render_chat(messages)
    assert gguf_llm.render_chat(messages) == prompt
    assert gguf_llm.tokenizer.encode(prompt) == llm.tokenizer.encode(prompt)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    assert gguf_llm.generate(prompt, params)[0].token_ids == llm.generate(prompt, params)[0].token_ids
