"""GGUF models answer as llama.cpp does: teacher-forced on llama.cpp's outputs (shared/testdata/gguf)."""

import json
import statistics

import pytest

from ember.loader.model import load_model
from tests.engine_helpers import greedy_tokens, teacher_forced_agreement

GGUF_FILES = ["tiny-llama-bf16.gguf", "tiny-llama-Q8_0.gguf", "tiny-llama-Q6_K.gguf", "tiny-llama-Q4_K_M.gguf",
              "tiny-llama-Q4_0.gguf"]


@pytest.fixture(scope="module")
def refs(testdata):
    return json.loads((testdata / "gguf" / "tiny-llama-refs.json").read_text())


@pytest.mark.parametrize("name", GGUF_FILES)
def test_teacher_forced_agreement(name, refs, testdata):
    loaded = load_model(testdata / "gguf" / name, dtype="float32", device="cpu")
    top1_hits, top1_total, deltas = teacher_forced_agreement(loaded.model, loaded.config, refs[name])
    median, p95 = statistics.median(deltas), deltas[int(0.95 * (len(deltas) - 1))]
    assert top1_total > 20, "too few confident steps to judge"
    assert top1_hits / top1_total >= 0.98, (top1_hits, top1_total)
    assert median <= 0.06 and p95 <= 0.2, (median, p95)


def test_bf16_gguf_equals_hf_checkpoint(testdata):
    prompt = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203]
    gguf = load_model(testdata / "gguf" / "tiny-llama-bf16.gguf", dtype="float32", device="cpu")
    hf = load_model(testdata / "gguf" / "tiny-llama-hf", dtype="float32", device="cpu")
    assert greedy_tokens(gguf.model, gguf.config, prompt, 32) == greedy_tokens(hf.model, hf.config, prompt, 32)
