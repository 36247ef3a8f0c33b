"""GGUF models answer as llama.cpp does: teacher-forced on llama.cpp's outputs (shared/testdata/gguf)."""

import json
import statistics

import pytest
import torch

from ember.loader.model import load_model
from tests.engine_helpers import greedy_tokens, prefill_logits

GGUF_FILES = ["tiny-llama-bf16.gguf", "tiny-llama-Q8_0.gguf", "tiny-llama-Q6_K.gguf", "tiny-llama-Q4_K_M.gguf",
              "tiny-llama-Q4_0.gguf"]


@pytest.fixture(scope="module")
def refs(testdata):
    return json.loads((testdata / "gguf" / "tiny-llama-refs.json").read_text())


@pytest.mark.parametrize("name", GGUF_FILES)
def test_teacher_forced_agreement(name, refs, testdata):
    loaded = load_model(testdata / "gguf" / name, dtype="float32", device="cpu")
    top1_hits = top1_total = 0
    deltas = []
    for case in refs[name]:
        ids = case["prompt_ids"] + case["output_ids"]
        logprobs = torch.log_softmax(prefill_logits(loaded.model, loaded.config, ids), dim=-1)
        first = len(case["prompt_ids"]) - 1
        for step, top in enumerate(case["top_logprobs"]):
            ours = logprobs[first + step]
            margin = top[0][1] - top[1][1]
            if margin > 0.2:
                top1_total += 1
                top1_hits += int(ours.argmax()) == top[0][0]
            deltas += [abs(ours[token].item() - logprob) for token, logprob in top]
    deltas.sort()
    median, p95 = statistics.median(deltas), deltas[int(0.95 * (len(deltas) - 1))]
    assert top1_total > 20, "too few confident steps to judge"
    assert top1_hits / top1_total >= 0.98, (top1_hits, top1_total)
    assert median <= 0.06 and p95 <= 0.2, (median, p95)


def test_bf16_gguf_equals_hf_checkpoint(testdata):
    prompt = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203]
    gguf = load_model(testdata / "gguf" / "tiny-llama-bf16.gguf", dtype="float32", device="cpu")
    hf = load_model(testdata / "gguf" / "tiny-llama-hf", dtype="float32", device="cpu")
    assert greedy_tokens(gguf.model, gguf.config, prompt, 32) == greedy_tokens(hf.model, hf.config, prompt, 32)
