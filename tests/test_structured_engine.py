"""Constrained decoding inside the engine: xgrammar's view of each vocabulary, the mask the sampler applies
(against a token-by-token reference), `after`, min_tokens, logprobs, and constrained and free requests sharing
preempted batches with the same outputs as alone."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest
import torch

from ember.engine.engine import EngineArgs, LLMEngine
from ember.engine.structured import Grammars
from ember.errors import InvalidParameter
from ember.layers.sampler import Sampler, SamplingState, grammar_masks
from ember.sampling_params import SamplingParams, StructuredOutput
from ember.store.memory import kv_bytes_per_token
from ember.tokenizer.tokenizer import load_tokenizer

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"]}


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(None, EngineArgs(dtype="float32", device="cpu", max_num_seqs=16))


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]]) -> list[tuple[list[int], str, str]]:
    """Run requests together in one engine; (tokens, text, finish_reason) per request."""
    ids = [f"r{next(_ids)}" for _ in requests]
    for request_id, (prompt, params) in zip(ids, requests, strict=True):
        engine.add_request(request_id, prompt, params)
    done: dict[str, tuple[list[int], list[str], list[str]]] = {r: ([], [], []) for r in ids}
    for _ in range(10_000):
        if not engine.has_work():
            break
        for out in engine.step():
            tokens, text, reason = done[out.request_id]
            tokens += out.token_ids
            text.append(out.text_delta)
            if out.finished:
                reason.append(out.finish_reason)
    return [(tokens, "".join(text), reason[0]) for tokens, text, reason in (done[r] for r in ids)]


_ids = iter(range(10**9))


def regex_literal(text: str) -> str:
    return re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", text)


@pytest.mark.parametrize("name", ["llama-spm", "phi-3", "gpt-2", "deepseek-coder"])
def test_vocabulary_bytes_match_the_tokenizer(testdata, name):
    """xgrammar decodes each token as ember's tokenizer does, so a grammar accepts the tokenization of its text."""
    tokenizer = load_tokenizer(testdata / "vocab" / f"ggml-vocab-{name}.gguf")
    grammars = Grammars(tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids)
    text = 'Ab {"key": [1, 2.5e3, "h\u00e9llo \U0001f999"], "x": null}\n\tend'
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoded = b"".join(grammars.token_bytes[t] for t in ids).decode()
    assert decoded.removeprefix(" ") == tokenizer.decode(ids) == text  # SentencePiece's leading space aside
    state = grammars.state(StructuredOutput("regex", " ?" + regex_literal(text)))
    assert all(state.accept(t) for t in ids)
    assert state.matcher.is_completed()
    eos = next(iter(tokenizer.eos_token_ids))
    assert state.accept(eos) and state.finished


def test_sampler_mask_matches_reference(engine):
    """Masked logits are -inf exactly where the grammar rejects the token (one matcher fork per token), the
    others keep their value, and a free row in the same batch is untouched."""
    tokenizer, vocab = engine.tokenizer, engine.vocab_size
    state = engine.grammars.state(StructuredOutput("json_schema", json.dumps(PERSON)))
    text = '{"name": "Ann", "age": 42, "tags": ["b"]}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    eos = next(iter(engine.eos_token_ids))
    generator = torch.Generator().manual_seed(0)
    for step, token in enumerate([*ids, eos]):
        logits = torch.randn(2, vocab, generator=generator)
        states = [SamplingState(SamplingParams(temperature=0), None, [1], [], grammar=state),
                  SamplingState(SamplingParams(temperature=0), None, [1], [])]
        adjusted = Sampler.adjust_logits(logits, states, grammar_masks(states, vocab))
        allowed = torch.tensor([state.matcher.fork().accept_token(t) for t in range(vocab)])
        assert torch.equal(torch.isinf(adjusted[0]), ~allowed), f"step {step}"
        assert torch.equal(adjusted[0][allowed], logits[0][allowed])
        assert torch.equal(adjusted[1], logits[1])
        assert allowed[token], f"step {step}: the reference rejects the text's own token"
        assert state.accept(token)
    assert state.finished and 0 < int(allowed.sum()) < vocab


def test_constrained_and_free_share_preempted_batches(engine):
    """16 requests at once, half constrained (seeded and greedy), in a cache small enough to force preemption:
    every output equals the same request run alone, and every constrained one is valid."""
    tokenizer = engine.tokenizer
    point = {"type": "object", "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1},
                                              "ok": {"type": "boolean"}}, "required": ["x"]}
    kinds = [StructuredOutput("json_schema", json.dumps(PERSON)), StructuredOutput("json_schema", json.dumps(point)),
             StructuredOutput("regex", r"[a-z]{2,6}( [a-z]{2,6}){0,3}\."),
             StructuredOutput("choice", json.dumps(["red", "green", "blue"]))]
    requests = []
    for i in range(16):
        prompt = tokenizer.encode(f"Request {i}: tell me about item number {i * 7}.")
        structured = kinds[i // 2 % 4] if i % 2 == 0 else None
        requests.append((prompt, SamplingParams(temperature=0.0 if i % 4 == 0 else 1.0, seed=i, max_tokens=48,
                                                structured=structured)))
    alone = [run(engine, [request])[0] for request in requests]
    per_token = kv_bytes_per_token(engine.loaded.config, engine.loaded.dtype.itemsize)
    tight = LLMEngine(None, EngineArgs(dtype="float32", device="cpu", block_size=4, max_batched_tokens=24,
                                       kv_memory=60 * 4 * per_token, max_num_seqs=16))
    together = run(tight, requests)
    assert tight.scheduler.num_preemptions > 0, "the test must force preemption"
    assert together == alone
    for (_, params), (_, text, reason) in zip(requests, together, strict=True):
        if params.structured is None:
            continue
        assert reason == "stop", text
        kind, spec = params.structured.kind, params.structured.spec
        if kind == "json_schema":
            jsonschema.validate(json.loads(text), json.loads(spec))
        elif kind == "regex":
            assert re.fullmatch(spec, text)
        else:
            assert text in json.loads(spec)
    assert tight.block_manager.num_used_blocks == 0


def test_after_marker_frees_then_constrains(engine):
    """Greedy: the text up to the marker is the free run's, then the grammar takes over and ends the sequence."""
    prompt = engine.tokenizer.encode("Once upon a time")
    free_tokens, free_text, _ = run(engine, [(prompt, SamplingParams(temperature=0, max_tokens=8))])[0]
    marker = engine.tokenizer.decode(free_tokens[:3])
    assert marker and free_text.startswith(marker)
    structured = StructuredOutput("regex", r" = [0-9]{3}", after=marker)
    tokens, text, reason = run(engine, [(prompt, SamplingParams(temperature=0, max_tokens=40, structured=structured))])[0]
    assert tokens[:3] == free_tokens[:3]
    assert re.fullmatch(re.escape(marker) + r" = [0-9]{3}", text) and reason == "stop"


def test_grammar_beats_min_tokens_and_logprobs_are_over_allowed_tokens(engine):
    choices = ["yes", "no"]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=20, min_tokens=15, logprobs=5,
                            structured=StructuredOutput("choice", json.dumps(choices)))
    tokens, text, reason = run(engine, [(engine.tokenizer.encode("Is it?"), params)])[0]
    assert text in choices and reason == "stop"
    state = engine.grammars.state(params.structured)
    allowed = {t for t in range(engine.vocab_size) if state.matcher.fork().accept_token(t)}
    out = _generate_with_logprobs(engine, params)
    first = out[0]
    assert {t for t, _ in first.top} <= allowed and first.token_id in allowed
    if len(first.top) < 5:  # every allowed token is listed: their probabilities sum to one
        assert math.isclose(sum(math.exp(v) for _, v in first.top), 1.0, rel_tol=1e-4)


def _generate_with_logprobs(engine, params):
    engine.add_request("lp", engine.tokenizer.encode("Is it?"), params)
    logprobs = []
    while engine.has_work():
        for out in engine.step():
            logprobs += out.logprobs or []
    return logprobs


def test_invalid_specs_name_the_field(engine):
    for structured in (StructuredOutput("json_schema", '{"type": "foo"}'), StructuredOutput("regex", "a(b"),
                       StructuredOutput("grammar", "root ::= missing"), StructuredOutput("choice", "[]")):
        with pytest.raises(InvalidParameter) as err:
            engine.grammars.compile(structured, "response_format")
        assert err.value.field == "response_format"
