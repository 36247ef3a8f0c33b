"""Prompt-token log-probabilities (what lm-evaluation-harness scores) against a teacher-forced transformers pass."""

from __future__ import annotations

import pytest
import torch

from ember.engine.engine import EngineArgs, LLMEngine
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


def test_scoring_bypasses_the_prefix_cache_and_keeps_generation(engine):
    prompt = prompt_of(engine, 40)
    plain = run(engine, "plain", prompt, SamplingParams(max_tokens=6, temperature=0))
    # The same prompt again: its blocks are cached now, yet every position is scored.
    scored = run(engine, "scored", prompt, SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=0))
    assert [t for o in scored for t in o.token_ids] == [t for o in plain for t in o.token_ids]
    assert scored[0].cached_tokens == 0
    assert len(scored[0].prompt_logprobs) == 40 and all(e.top == [] for e in scored[0].prompt_logprobs[1:])
    assert all(o.prompt_logprobs is None for o in scored[1:])
