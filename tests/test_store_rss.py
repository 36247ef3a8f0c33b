"""The memory estimator against what a process really holds: estimated vs measured RSS within 15 %.

For each tiny GGUF fixture a fresh interpreter imports ember and torch and loads, runs and drops one warm-up
engine on the same file (so kernels, the native library and allocator pools are already there), then records
its RSS: the baseline. It then loads the model with `ember.LLM(path, kv_memory=..., max_model_len=4096)`,
generates a few tokens, reads every row of the token embedding once (QuantEmbedding keeps the file's blocks on
a map and pages rows in as tokens are looked up) and writes every KV cache slot (on CPU the cache is an
anonymous map whose pages are committed as tokens fill it): a long-running server ends up with all of both,
and that worst case is what the estimator counts. Then it records RSS again.

Compared: measured = RSS after − baseline, against estimate_memory(path, 4096, "bfloat16")'s weights + KV
(kv_memory is exactly the estimated KV, 4 MiB at 4096 tokens) + the tokenizer part of its overhead
(ember.bench.estimates.tokenizer_bytes). The rest of the overhead (RUNTIME_BYTES for the framework, kernels
and allocator pools, and the activations of a 512-token prefill) is excluded from both sides: the baseline
already holds the runtime, and a few-token prompt never reaches that activation size. The files are only
9-13 MB, so each RSS is read after gc and malloc_trim, with glibc's mmap threshold fixed at 64 KiB so that
freed tensors go back to the system instead of staying in the heap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ember.bench.estimates import tokenizer_bytes
from ember.store.memory import estimate_memory, model_config

CONTEXT = 4096
PROBE = """
import ctypes, gc, json, sys
import psutil, torch
import ember
from ember import SamplingParams

path, context, kv_memory = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
proc, libc = psutil.Process(), ctypes.CDLL("libc.so.6")

def settled_rss():
    gc.collect()
    libc.malloc_trim(0)
    return proc.memory_info().rss

params = SamplingParams(max_tokens=8, temperature=0.0)
warm = ember.LLM(path, device="cpu", dtype="bfloat16", max_model_len=64, kv_memory=64 * 1024)
warm.generate("Hello", params)
del warm
base = settled_rss()
llm = ember.LLM(path, device="cpu", dtype="bfloat16", max_model_len=context, kv_memory=kv_memory)
llm.generate("Once upon a time", params)
int(llm.engine.loaded.model.model.embed_tokens.rows.sum())  # every embedding row paged in
# Every KV page written by a plain memset: a torch fill could start its thread pool, whose stacks RSS would count.
for cache in (llm.engine.runner.k_cache, llm.engine.runner.v_cache):
    ctypes.memset(cache.data_ptr(), 0, cache.nbytes)
print(json.dumps({"base": base, "after": settled_rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim and a fixed mmap threshold: glibc")
@pytest.mark.parametrize("quant", ["Q4_0", "Q8_0", "Q4_K_M", "Q6_K"])
def test_estimated_memory_matches_measured_rss(testdata, quant):
    path = testdata / "gguf" / f"tiny-llama-{quant}.gguf"
    est = estimate_memory(path, CONTEXT, "bfloat16")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(CONTEXT), str(est.kv_bytes)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    measured = rss["after"] - rss["base"]
    expected = est.weights_bytes + est.kv_bytes + tokenizer_bytes(model_config(path))
    print(f"{quant}: measured {measured / 1e6:.2f} MB, estimated {expected / 1e6:.2f} MB "
          f"(weights {est.weights_bytes / 1e6:.2f}, KV {est.kv_bytes / 1e6:.2f}, "
          f"tokenizer {tokenizer_bytes(model_config(path)) / 1e6:.2f}), {measured / expected - 1:+.1%}")
    assert abs(measured - expected) <= 0.15 * expected
