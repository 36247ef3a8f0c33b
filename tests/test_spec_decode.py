"""Speculative decoding is lossless: greedy tokens equal plain decoding's, sampled tokens follow the
target's distribution, and rejected drafts leave nothing behind in either KV cache."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import chisquare

from ember.engine.engine import EngineArgs, LLMEngine
from ember.engine.proposers import NgramProposer
from ember.engine.spec_decode import Proposal, draw, verify
from ember.errors import InvalidParameter
from ember.layers.sampler import SamplingState
from ember.llm import LLM
from ember.sampling_params import SamplingParams
from ember.store.memory import kv_bytes_per_token
from tests.engine_helpers import prefill_logits
from tests.tiny_models import build_tiny_model, copy_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory, testdata):
    """A tiny target, a draft that is the target with noise added (it agrees often, not always) and an
    unrelated draft (it almost never agrees)."""
    root = tmp_path_factory.mktemp("spec")
    target = build_tiny_model("llama", root / "target")
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", target)
    near = root / "near"
    shutil.copytree(target, near)
    weights = load_file(near / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    save_file({name: w + 0.04 * torch.randn(w.shape, generator=generator) for name, w in weights.items()},
              near / "model.safetensors", metadata={"format": "pt"})
    other = build_tiny_model("llama", root / "other", seed=1)
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", other)
    return {"target": target, "near": near, "other": other}


def repetitive_prompts(count: int) -> list[list[int]]:
    """Prompts that repeat themselves, so n-gram lookup finds matches."""
    return [[1] + [(5 * i + 11 * (j % (3 + i % 4))) % 300 + 3 for j in range(6 + 2 * i)] for i in range(count)]


def make_llm(directory, **args) -> LLM:
    return LLM(str(directory), dtype="float32", device="cpu", **args)


def used_blocks(engine: LLMEngine) -> tuple[int, int]:
    draft = engine.speculator.draft
    return engine.block_manager.num_used_blocks, draft.blocks.num_used_blocks if draft else 0


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_greedy_equal_alone_and_in_preempted_batch(models, mode):
    spec = {"spec_ngram": 2} if mode == "ngram" else {"draft": str(models["near"])}
    batch = repetitive_prompts(16)
    plain = make_llm(models["target"], max_num_seqs=16)
    expected = [o.token_ids for o in plain.generate(batch, GREEDY)]
    alone = make_llm(models["target"], max_num_seqs=1, **spec)
    assert [alone.generate([p], GREEDY)[0].token_ids for p in batch[:4]] == expected[:4]
    per_token = kv_bytes_per_token(plain.engine.loaded.config, plain.engine.loaded.dtype.itemsize)
    tight = make_llm(models["target"], block_size=4, max_batched_tokens=48, kv_memory=60 * 4 * per_token,
                     max_num_seqs=16, max_model_len=64, spec_tokens=3, **spec)
    got = tight.generate(batch, GREEDY)
    stats = tight.engine.stats()
    assert tight.engine.scheduler.num_preemptions > 0, "the test must force preemption"
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"], "drafts must be kept and rejected"
    assert [o.token_ids for o in got] == expected
    assert used_blocks(tight.engine) == (0, 0)


# A draft that is the target itself keeps every draft: each position's penalties must then see the drafts
# before it exactly as plain decoding sees the tokens it generated.
@pytest.mark.parametrize("spec", [{"spec_ngram": 1}, {"draft": "target"}])
def test_penalties_bias_stops_and_logprobs_as_without_speculation(models, spec):
    spec = {k: str(models[v]) if k == "draft" else v for k, v in spec.items()}
    prompts = repetitive_prompts(4)
    params = [
        SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=16, presence_penalty=0.7, frequency_penalty=0.4,
                       logit_bias={40: 3.0, 41: -2.0}, min_tokens=5, logprobs=0),
        SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[prompts[2][3]], ignore_eos=True),
    ]
    plain = make_llm(models["target"])
    fast = make_llm(models["target"], **spec)
    for param in params:
        for prompt in prompts:
            want, got = plain.generate([prompt], param)[0], fast.generate([prompt], param)[0]
            assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
            if want.logprobs is not None:
                for a, b in zip(got.logprobs, want.logprobs, strict=True):
                    assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
                    assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    stats = fast.engine.stats()
    assert stats["spec_verifications"] > 0
    if "draft" in spec:
        assert stats["spec_accepted_tokens"] == stats["spec_proposed_tokens"]
    # The stop string is the text of a token the greedy run produces: the reply must end right before it.
    text = plain.generate([prompts[0]], GREEDY)[0].text
    stop = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[text[len(text) // 2:][:3]])
    assert fast.generate([prompts[0]], stop)[0].text == plain.generate([prompts[0]], stop)[0].text


def _chi_square(counts: dict, expected: dict, samples: int) -> float:
    """p-value of the observed counts against expected probabilities, rare cells pooled (expected < 5)."""
    observed, wanted, rest_observed, rest_wanted = [], [], 0, 0.0
    for cell, probability in expected.items():
        if probability * samples >= 5:
            observed.append(counts.get(cell, 0))
            wanted.append(probability * samples)
        else:
            rest_observed += counts.get(cell, 0)
            rest_wanted += probability * samples
    unexpected = sum(n for cell, n in counts.items() if cell not in expected)
    assert unexpected == 0, f"{unexpected} samples the target gives probability 0"
    observed.append(rest_observed)
    wanted.append(rest_wanted + 1e-9)
    return chisquare(observed, [w * sum(observed) / sum(wanted) for w in wanted]).pvalue


def test_rejection_sampling_follows_the_target_distribution():
    """verify() alone, many draws, for point-mass (n-gram) and sampled (draft model) proposals of 2 tokens:
    the first two tokens of a generation (the second drawn plainly when the first ended the chunk) follow
    p0(x) p1(y | x), where the second position's logits depend on the first token as in a real model."""
    torch.manual_seed(0)
    vocab, samples = 5, 6000
    first = torch.randn(vocab) * 1.5
    after = torch.randn(vocab, vocab) * 1.5  # row x: logits after token x
    q = (torch.randn(2, vocab) * 1.5).softmax(-1)
    generator = torch.Generator().manual_seed(3)
    state = SamplingState(SamplingParams(temperature=1.0), generator, [1], [])
    p0, p1 = first.softmax(-1), after.softmax(-1)
    expected = {(x, y): float(p0[x] * p1[x, y]) for x in range(vocab) for y in range(vocab)}
    for sampled in (False, True):
        items = []
        for _ in range(samples):
            if sampled:
                drafts = [int(torch.multinomial(q[0], 1, generator=generator)),
                          int(torch.multinomial(q[1], 1, generator=generator))]
                proposal = Proposal(drafts, q.clone())
            else:
                proposal = Proposal([3, 1])
            rows = torch.stack([first, after[proposal.tokens[0]], torch.zeros(vocab)])
            items.append((rows, state, proposal))
        counts: dict = {}
        for tokens, _ in verify(items):
            if len(tokens) == 1:  # the next step would sample the second token plainly
                tokens = tokens + [int(torch.multinomial(p1[tokens[0]], 1, generator=generator))]
            counts[tuple(tokens[:2])] = counts.get(tuple(tokens[:2]), 0) + 1
        assert _chi_square(counts, expected, samples) > 1e-3


def test_draw_follows_each_rows_distribution_from_its_own_generator():
    """draw(): one inverse-transform draw per row of unnormalised probabilities; a token of probability 0 never
    comes out, and a seeded row gives the same token whatever rows are drawn beside it."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2], [2.1, 0.0, 0.9, 0.0, 0.0]])  # the second sums to 3
    samples = 3000
    generator = torch.Generator().manual_seed(5)
    tokens = draw(probs.repeat(samples, 1), [generator] * 2 * samples)
    for row in range(2):
        counts: dict = {}
        for token in tokens[row::2]:
            counts[token] = counts.get(token, 0) + 1
        expected = {t: p / float(probs[row].sum()) for t, p in enumerate(probs[row].tolist()) if p > 0}
        assert _chi_square(counts, expected, samples) > 1e-3
    alone = [draw(probs[:1], [torch.Generator().manual_seed(seed)])[0] for seed in range(20)]
    beside = [draw(probs, [torch.Generator().manual_seed(seed), None])[0] for seed in range(20)]
    assert alone == beside and len(set(alone)) > 1


def test_verify_in_one_batch_equals_each_item_alone():
    """Greedy rows (plain, and with a penalty and bias that depend on the drafts before them) and seeded
    sampling rows (n-gram and draft-model proposals) verified together give each item's own result."""
    vocab = 12

    def items():
        q = (torch.randn(3, vocab, generator=torch.Generator().manual_seed(4)) * 2).softmax(-1)
        specs = [
            (SamplingParams(temperature=0, logprobs=2), None, [3, 5, 7]),
            (SamplingParams(temperature=1.0, seed=1), None, [2, 2]),
            (SamplingParams(temperature=0, repetition_penalty=1.5, logit_bias={4: 0.5}), None, [4, 4, 9]),
            (SamplingParams(temperature=0.7, top_k=5, seed=2, logprobs=1), q, [1, 6, 0]),
        ]
        result = []
        for index, (params, probs, drafts) in enumerate(specs):
            generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
            state = SamplingState(params, generator, [1, 4, 2], [4])
            rows = torch.randn(len(drafts) + 1, vocab, generator=torch.Generator().manual_seed(index)) * 3
            for position in range(index % 3 + 1):  # the first 1 to 3 drafts are likely kept
                rows[position, drafts[position]] += 8
            result.append((rows, state, Proposal(drafts, probs)))
        return result

    together = verify(items())
    alone = [verify([item])[0] for item in items()]
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(together, alone, strict=True):
        assert tokens == want_tokens
        assert (logprobs is None) == (want_logprobs is None)
        for a, b in zip(logprobs or [], want_logprobs or [], strict=True):
            assert (a.token_id, a.top) == (b.token_id, b.top) and a.logprob == pytest.approx(b.logprob)
    assert len({len(tokens) for tokens, _ in together}) > 1  # acceptance differs between the items


def test_sampled_outputs_follow_the_target_distribution(models):
    """End to end with a draft model: the joint distribution of the first two sampled tokens (the second is
    verified from a draft) equals the target's, computed from its own logits."""
    # The first token comes from the prompt's prefill; the second from verifying one draft (max_tokens
    # leaves room for a draft and the target's own token).
    params = SamplingParams(temperature=0.8, top_k=4, max_tokens=3, ignore_eos=True)
    prompt = [1, 17, 42, 99, 5]
    llm = make_llm(models["target"], draft=str(models["near"]), max_num_seqs=256, max_batched_tokens=2048,
                   spec_tokens=2)
    samples = 1500
    outputs = llm.generate([prompt] * samples, params)
    assert llm.engine.stats()["spec_verifications"] >= samples * 0.9

    model, config = llm.engine.loaded.model, llm.engine.loaded.config

    def probs(tokens):
        last = prefill_logits(model, config, tokens)[-1] / 0.8
        top = last.topk(4)
        return dict(zip(top.indices.tolist(), top.values.softmax(-1).tolist(), strict=True))

    expected = {}
    for first, p_first in probs(prompt).items():
        for second, p_second in probs(prompt + [first]).items():
            expected[(first, second)] = p_first * p_second
    counts: dict = {}
    for out in outputs:
        counts[tuple(out.token_ids[:2])] = counts.get(tuple(out.token_ids[:2]), 0) + 1
    assert _chi_square(counts, expected, samples) > 1e-3


def test_seeded_sampling_repeats_with_speculation(models):
    llm = make_llm(models["target"], spec_ngram=2)
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=7, ignore_eos=True)
    prompts = repetitive_prompts(3)
    alone = llm.generate([prompts[0]], params)[0].token_ids
    batched = llm.generate(prompts, params)[0].token_ids
    assert alone == batched


def test_blocks_return_to_zero_after_aborts_mid_speculation(models):
    engine = LLMEngine(str(models["target"]), EngineArgs(dtype="float32", device="cpu", block_size=4,
                                                         draft=str(models["near"])))
    for i, prompt in enumerate(repetitive_prompts(6)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.7 if i % 2 else 0, max_tokens=64))
    for _ in range(4):
        engine.step()
    assert engine.stats()["spec_verifications"] > 0
    assert min(used_blocks(engine)) > 0
    for i in range(6):
        engine.abort(f"r{i}")
    assert used_blocks(engine) == (0, 0)
    assert not engine.has_work()


def test_opt_out_and_k_limits(models):
    llm = make_llm(models["target"], draft=str(models["target"]), spec_tokens=3)
    out = llm.generate([repetitive_prompts(1)[0]], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    stats = llm.engine.stats()
    # The draft is the target itself: every draft is kept, k never exceeds what max_tokens leaves.
    assert stats["spec_accepted_tokens"] == stats["spec_proposed_tokens"] > 0
    assert len(out[0].token_ids) == 7
    before = dict(stats)
    llm.generate([repetitive_prompts(1)[0]], SamplingParams(temperature=0, max_tokens=7, speculative=False))
    assert llm.engine.stats()["spec_proposed_tokens"] == before["spec_proposed_tokens"]


def test_ngram_lookup_proposes_the_continuation_of_the_first_match():
    lookup = NgramProposer(3)
    assert lookup.propose([5, 6, 7, 8, 9, 1, 6, 7], 3) == [8, 9, 1]
    assert lookup.propose([5, 6, 7, 8, 4, 7], 4) == [8, 4, 7]  # falls back to a 1-gram
    assert lookup.propose([1, 2, 3], 2) == []


def test_draft_with_another_vocabulary_is_refused(models, tmp_path):
    other = tmp_path / "other-vocab"
    shutil.copytree(models["near"], other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    token = next(t for t in vocab if vocab[t] == 100)
    vocab["zz-not-in-target"] = vocab.pop(token)
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(InvalidParameter, match="different vocabulary"):
        make_llm(models["target"], draft=str(other))
    with pytest.raises(InvalidParameter, match="spec_tokens"):
        make_llm(models["target"], spec_ngram=2, spec_tokens=0)


def test_metrics_report_acceptance(models):
    from types import SimpleNamespace

    from ember.server.metrics import Metrics

    llm = make_llm(models["target"], draft=str(models["target"]), spec_tokens=2)
    llm.generate([repetitive_prompts(1)[0]], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    stats = llm.engine.stats()
    registry = SimpleNamespace(list=lambda: [SimpleNamespace(name="tiny", engine=llm.engine)])
    text = Metrics(registry).render().decode()
    assert f'ember_spec_draft_tokens_total{{model="tiny"}} {float(stats["spec_proposed_tokens"])}' in text
    assert 'ember_spec_acceptance_rate{model="tiny"} 1.0' in text
    # Every draft kept: each verification gains its drafts and the target's own token.
    length = (stats["spec_accepted_tokens"] + stats["spec_verifications"]) / stats["spec_verifications"]
    assert f'ember_spec_mean_accepted_length{{model="tiny"}} {length}' in text


def test_request_fields_opt_out():
    from ember.server.ollama_options import ollama_params
    from ember.server.openai_api import sampling_params
    from ember.server.protocol import CompletionRequest

    body = CompletionRequest(prompt="hi", speculative=False)
    assert sampling_params(body, 4, None).speculative is False
    assert ollama_params({"speculative": False}).speculative is False
    with pytest.raises(InvalidParameter, match="speculative"):
        ollama_params({"speculative": "no"})


def test_cli_run_with_speculation_matches_python_api(testdata, capsys):
    from ember.cli.main import main

    model = str(testdata / "gguf" / "tiny-llama-hf")
    expected = LLM(model).generate("Hello", SamplingParams(temperature=0, max_tokens=8))[0].text
    capsys.readouterr()
    assert main(["run", model, "Hello", "--raw", "--max-tokens", "8", "--temperature", "0", "--repeat-penalty", "1",
                 "--draft", model, "--spec-tokens", "3"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["run", "--spec-ngram", "0", "/no/such", "hi"]) == 1
    error = capsys.readouterr().err
    assert "spec_ngram" in error and len(error.strip().splitlines()) == 1


def test_bench_reports_acceptance(models, capsys):
    from ember.cli.main import main

    target = str(models["target"])
    assert main(["bench", target, "-p", "0", "-n", "8", "-r", "1", "--no-warmup", "--draft", target,
                 "--spec-tokens", "3", "--output", "json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    # Its own draft: every drafted token kept, K + 1 = 4 tokens per verification until max_tokens caps K.
    assert result["spec_acceptance_rate"] == 1.0 and 2 < result["spec_mean_accepted_length"] <= 4
    assert main(["bench", target, "-p", "0", "-n", "8", "-r", "1", "--no-warmup", "--spec-ngram", "2",
                 "--output", "md"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("| t/s | accept rate | accepted len |")
