"""Prompt-token log-probabilities (what lm-evaluation-harness scores) against a teacher-forced transformers pass."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from ember.engine.engine import EngineArgs, LLMEngine
from ember.kernels import native
from ember.sampling_params import SamplingParams
from tests.tiny_models import build_tiny_model, copy_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, testdata):
    directory = build_tiny_model("llama", tmp_path_factory.mktemp("score"))  # fp32 weights: exact reference
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", directory)
    return directory


@pytest.fixture(scope="module")
def reference(model_dir):
    """log_softmax of transformers' fp32 logits: row p is the distribution of token p + 1."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="eager").eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


def run(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams) -> list:
    engine.add_request(request_id, prompt, params)
    outputs = []
    for _ in range(1000):
        outputs += [o for o in engine.step() if o.request_id == request_id]
        if outputs and outputs[-1].finished:
            return outputs
    raise AssertionError("the request did not finish")


@pytest.fixture(scope="module")
def engine(model_dir):
    # A 16-token step budget: a 70-token prompt is prefilled in five chunks, each scored.
    return LLMEngine(str(model_dir), EngineArgs(dtype="float32", device="cpu", max_batched_tokens=16,
                                                kv_memory=2**22, block_size=4))


def prompt_of(engine: LLMEngine, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(length)
    return [engine.tokenizer.bos_token_id, *torch.randint(3, 320, (length - 1,), generator=generator).tolist()]


@pytest.mark.parametrize("length", [2, 9, 70])
def test_prompt_logprobs_equal_teacher_forcing(engine, reference, length):
    prompt = prompt_of(engine, length)
    outputs = run(engine, f"score-{length}", prompt, SamplingParams(max_tokens=0, prompt_logprobs=3))
    assert len(outputs) == 1 and outputs[0].finish_reason == "length" and outputs[0].token_ids == []
    assert outputs[0].completion_tokens == 0 and outputs[0].prompt_tokens == length
    scored = outputs[0].prompt_logprobs
    assert len(scored) == length and scored[0] is None
    expected = reference(prompt)
    for position, entry in enumerate(scored[1:]):
        assert entry.token_id == prompt[position + 1]
        assert entry.logprob == pytest.approx(expected[position, prompt[position + 1]].item(), abs=1e-4)
        values, ids = expected[position].topk(3)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_python_api_scores_the_prompt(model_dir, reference):
    from ember.llm import LLM

    prompt = [1, 17, 99, 250, 7, 64]
    out = LLM(str(model_dir), dtype="float32", device="cpu").generate(
        prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.token_ids == [] and out.finish_reason == "length" and out.prompt_logprobs[0] is None
    expected = reference(prompt)
    assert [e.logprob for e in out.prompt_logprobs[1:]] == pytest.approx(
        [expected[p, t].item() for p, t in enumerate(prompt[1:])], abs=1e-4)


def test_scoring_bypasses_the_prefix_cache_and_keeps_generation(engine):
    prompt = prompt_of(engine, 40)
    plain = run(engine, "plain", prompt, SamplingParams(max_tokens=6, temperature=0))
    # The same prompt again: its blocks are cached now, yet every position is scored.
    scored = run(engine, "scored", prompt, SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=0))
    assert [t for o in scored for t in o.token_ids] == [t for o in plain for t in o.token_ids]
    assert scored[0].cached_tokens == 0
    assert len(scored[0].prompt_logprobs) == 40 and all(e.top == [] for e in scored[0].prompt_logprobs[1:])
    assert all(o.prompt_logprobs is None for o in scored[1:])


# --- through the server, as lm-evaluation-harness' local-completions model sends it ---------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.server_helpers import shared_server

    return shared_server(tmp_path_factory)


@pytest.fixture(scope="module")
def served_reference(server):
    """log_softmax of the served model's logits, from one teacher-forced forward pass of the whole prompt."""
    from ember.loader.model import load_model
    from tests.engine_helpers import prefill_logits

    loaded = load_model(str(server.model_dir), dtype="float32", device="cpu")
    return lambda ids: torch.log_softmax(prefill_logits(loaded.model, loaded.config, ids, chunk=len(ids)), dim=-1)


def lm_eval_request(server, prompts: list[list[int]], max_tokens: int) -> dict:
    body = {"model": server.model, "prompt": prompts, "max_tokens": max_tokens, "logprobs": 1, "echo": True,
            "temperature": 0, "seed": 1234}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_lm_eval_scoring_request(server, served_reference):
    generator = torch.Generator().manual_seed(7)
    short = [1, *torch.randint(100, 30000, (20,), generator=generator).tolist()]
    # Longer than the server's 512-token step budget: prefilled (and scored) in several chunks.
    long = [1, *torch.randint(100, 30000, (700,), generator=generator).tolist()]
    reply = lm_eval_request(server, [short, long], 0)
    assert reply["usage"]["completion_tokens"] == 0
    for choice, prompt in zip(sorted(reply["choices"], key=lambda c: c["index"]), [short, long], strict=True):
        scored = choice["logprobs"]
        assert choice["finish_reason"] == "length" and len(scored["tokens"]) == len(prompt)
        assert scored["token_logprobs"][0] is None and scored["top_logprobs"][0] is None
        expected = served_reference(prompt)
        got = torch.tensor(scored["token_logprobs"][1:])
        want = expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        # The model's weights are bf16: on a CPU with AVX512-BF16 its activations are rounded to bf16 before
        # each product (llama.cpp's scheme), and a 512-row step sums in another order than the reference's
        # single 21- or 701-row pass (packed GEMM vs dot-product tiles), so a rounding of x may land on the
        # other side: ~1e-2 apart at most here. A chunking or position error would be off by whole units.
        atol = 3e-2 if native.bf16_dot(native.isa()) else 1e-3
        assert (got - want).abs().max().item() < atol
        # top_logprobs: the most likely token's log-probability at each position (lm-eval's greedy check)
        best = [max(top.values()) for top in scored["top_logprobs"][1:]]
        assert torch.allclose(torch.tensor(best), expected[:-1].max(dim=-1).values, atol=atol)


def test_generation_unchanged_by_scoring(server):
    prompt = [1, 450, 4996, 17354, 1701, 29916]
    plain = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                                             "logprobs": 1}, timeout=60).json()["choices"][0]
    scored = lm_eval_request(server, [prompt], 5)["choices"][0]
    assert scored["text"].endswith(plain["text"])
    tail = {k: v[len(prompt):] for k, v in scored["logprobs"].items() if k != "text_offset"}
    assert tail["tokens"] == plain["logprobs"]["tokens"]
    assert tail["token_logprobs"] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-4)


def test_streamed_echo_lists_the_prompt_first(server):
    prompt = [1, 450, 4996, 17354]
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "logprobs": 0, "echo": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    logprobs = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    tokens = [t for lp in logprobs for t in lp["token_logprobs"]]
    assert len(tokens) == len(prompt) + 2 and tokens[0] is None and None not in tokens[1:]


def test_preempted_requests_score_each_position_once(engine, model_dir):
    from ember.store.memory import kv_bytes_per_token

    prompts = [prompt_of(engine, 20 + 3 * i) for i in range(12)]
    params = SamplingParams(max_tokens=16, temperature=0, prompt_logprobs=2)
    alone = [run(engine, f"alone-{i}", p, params) for i, p in enumerate(prompts)]
    per_token = kv_bytes_per_token(engine.loaded.config, engine.loaded.dtype.itemsize)
    # A cache far smaller than twelve sequences need, and a 7-token budget: chunked prefill and preemptions.
    tight = LLMEngine(str(model_dir), EngineArgs(dtype="float32", device="cpu", block_size=4, max_batched_tokens=7,
                                                 kv_memory=24 * 4 * per_token, max_num_seqs=12, max_model_len=100))
    for i, prompt in enumerate(prompts):
        tight.add_request(f"tight-{i}", prompt, params)
    outputs: dict[str, list] = {}
    for _ in range(5000):
        for out in tight.step():
            outputs.setdefault(out.request_id, []).append(out)
        if not tight.has_work():
            break
    assert tight.scheduler.num_preemptions > 0, "the test must force preemption"
    for i, expected in enumerate(alone):
        got = outputs[f"tight-{i}"]
        assert [t for o in got for t in o.token_ids] == [t for o in expected for t in o.token_ids]
        scored, reference = got[0].prompt_logprobs, expected[0].prompt_logprobs
        assert len(scored) == len(prompts[i]) and [e.token_id for e in scored[1:]] == prompts[i][1:]
        assert [e.logprob for e in scored[1:]] == pytest.approx([e.logprob for e in reference[1:]], abs=1e-4)
        assert all(o.prompt_logprobs is None for o in got[1:])
