"""The memory estimator against what a process really holds: estimated vs measured RSS within 15 %.

Each tiny GGUF fixture runs twice, once per model of what ember holds (ember.store.memory): "native" (the
native CPU kernels: every matrix and the embedding are zero-copy views of the file's map, the tied output
layer a view of the embedding's rows) and "torch" (EMBER_NATIVE_KERNELS=0: int4/int8 repacks, the embedding
kept as the file's blocks plus its int8/int4 copy as the output layer). The estimate is taken in this process
under the same setting.

For each, a fresh interpreter imports ember and torch and loads, runs and drops one warm-up engine on the same
file (so kernels, the native library and its thread pool, and allocator pools are already there), then records
its RSS: the baseline. It then loads the model with `ember.LLM(path, device="cpu", dtype="auto",
kv_memory=..., max_model_len=4096)` (float32 activations and cache: what "auto" means on CPU), generates a few
tokens, reads every row of the token embedding once and writes every KV cache slot: a long-running server ends
up with all of both, and that worst case is what the estimator counts. Weights that are views of the map are
file-backed pages that count in RSS once touched: generating touches every matrix (each token multiplies all
of them), the embedding read touches all of its rows (lookups only page in the rows of the tokens seen), and
the header (metadata, vocabulary), parsed through the map, stays resident with it. On CPU the KV cache is an
anonymous map whose pages are committed as tokens fill it. Then it records RSS again.

Compared: measured = RSS after − baseline, against estimate_memory(path, 4096, "auto", "cpu")'s weights
(including the GGUF header) + KV (kv_memory is exactly the estimated KV, 8 MiB at 4096 tokens in float32) +
the tokenizer and engine parts of its overhead (ember.store.memory.tokenizer_bytes and ENGINE_BYTES, each
measured alone the same way; the engine part is the new engine's Python objects, code pages of torch touched
for the first time, page-cache pages the kernel maps around the faulting ones, and heap fragmentation, which
moves in ~1 MB steps between machines). The rest of the overhead (RUNTIME_BYTES for the framework, kernels and
allocator pools, and the activations of a 512-token prefill) is excluded from both sides: the baseline already
holds the runtime, and a few-token prompt never reaches that activation size. The files are only 9-13 MB, so each RSS is read after gc and malloc_trim, with glibc's mmap
threshold fixed at 64 KiB so that freed tensors go back to the system instead of staying in the heap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ember.kernels import native
from ember.store.memory import ENGINE_BYTES, estimate_memory, model_config, tokenizer_bytes

CONTEXT = 4096
PROBE = """
import ctypes, gc, json, sys
import ember  # before torch: it sets OMP_WAIT_POLICY for the kernels' thread pool
import psutil, torch
from ember import SamplingParams

path, context, kv_memory = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
proc, libc = psutil.Process(), ctypes.CDLL("libc.so.6")

def settled_rss():
    gc.collect()
    libc.malloc_trim(0)
    return proc.memory_info().rss

params = SamplingParams(max_tokens=8, temperature=0.0)
warm = ember.LLM(path, device="cpu", dtype="auto", max_model_len=64, kv_memory=64 * 1024)
warm.generate("Hello", params)
del warm
base = settled_rss()
llm = ember.LLM(path, device="cpu", dtype="auto", max_model_len=context, kv_memory=kv_memory)
llm.generate("Once upon a time", params)
model = llm.engine.loaded.model
int(model.model.embed_tokens.rows.sum())  # every embedding row paged in
# Every KV page written by a plain memset: a torch fill could start its thread pool, whose stacks RSS would count.
for cache in (llm.engine.runner.k_cache, llm.engine.runner.v_cache):
    ctypes.memset(cache.data_ptr(), 0, cache.nbytes)
backends = sorted({m.backend for m in model.modules() if hasattr(m, "backend")})
print(json.dumps({"base": base, "after": settled_rss(), "backends": backends}))
"""
BACKENDS = {"native": "1", "torch": "0"}  # EMBER_NATIVE_KERNELS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim and a fixed mmap threshold: glibc")
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("quant", ["Q4_0", "Q8_0", "Q4_K_M", "Q6_K"])
def test_estimated_memory_matches_measured_rss(testdata, monkeypatch, quant, backend):
    monkeypatch.setenv("EMBER_NATIVE_KERNELS", BACKENDS[backend])
    if backend == "native" and native.library() is None:
        pytest.skip("no native kernels on this machine (needs x86-64 with AVX2, FMA and F16C, and a C compiler)")
    path = testdata / "gguf" / f"tiny-llama-{quant}.gguf"
    est = estimate_memory(path, CONTEXT, "auto", "cpu")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(CONTEXT), str(est.kv_bytes)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    # the process ran the model the estimate describes: all native, or only the torch backends
    assert (rss["backends"] == ["native"]) == (backend == "native"), rss["backends"]
    measured = rss["after"] - rss["base"]
    tokenizer = tokenizer_bytes(model_config(path))
    expected = est.weights_bytes + est.kv_bytes + tokenizer + ENGINE_BYTES
    print(f"{quant} {backend}: measured {measured / 1e6:.2f} MB, estimated {expected / 1e6:.2f} MB "
          f"(weights {est.weights_bytes / 1e6:.2f}, KV {est.kv_bytes / 1e6:.2f}, tokenizer {tokenizer / 1e6:.2f}, "
          f"engine {ENGINE_BYTES / 1e6:.2f}), "
          f"{measured / expected - 1:+.1%}")
    assert abs(measured - expected) <= 0.15 * expected
