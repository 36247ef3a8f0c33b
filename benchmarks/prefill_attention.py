"""Prefill attention: ember's native causal kernel (ember/kernels/causal_attention.c) against torch's
scaled_dot_product_attention on the same float32 tensors, one thread, thread CPU time (steady on a busy machine).

    python benchmarks/prefill_attention.py                       # TinyLlama's shape: 32 heads, 4 KV heads, 64
    EMBER_ISA=avx2 python benchmarks/prefill_attention.py        # the AVX2 build on an AVX-512 machine

Each case is n query rows (a prefill chunk) at the end of a context of `context` tokens: a whole prompt
(n = context, torch's flash attention with is_causal) or a chunk after cached tokens (torch with an explicit mask,
as ember's torch path calls it). Prints the best of `--repeats` timings of each and torch / ember.
"""

# ruff: noqa: I001  (ember before torch: it sets OMP_WAIT_POLICY for its kernels' thread pool)
from __future__ import annotations

import ember  # noqa: F401
import argparse
import functools
import time

import torch
import torch.nn.functional as F

from ember.kernels import native
from ember.kernels.attention import causal_attention


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--cases", default="128x128,512x512,2048x2048,512x2048,512x4096",
                   help="comma list of ROWSxCONTEXT")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    scale = args.head_dim**-0.5
    print(f"kernels: {native.isa()}; {args.heads} heads, {args.kv_heads} KV heads, head_dim {args.head_dim}; "
          "one thread, ms of thread CPU time")
    print("| rows | context | ember | torch | torch / ember |\n|---:|---:|---:|---:|---:|")
    for case in args.cases.split(","):
        n, context = (int(v) for v in case.split("x"))
        q = torch.randn(n, args.heads, args.head_dim)
        k = torch.randn(context, args.kv_heads, args.head_dim)
        v = torch.randn(context, args.kv_heads, args.head_dim)
        mask = None
        if n < context:
            mask = torch.arange(context)[None, :] <= torch.arange(context - n, context)[:, None]

        ours = functools.partial(causal_attention, q, k, v, context, None, 0, 16, scale, None, None)
        theirs = functools.partial(
            F.scaled_dot_product_attention, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
            v.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
        a, b = best_time(ours, args.repeats) * 1e3, best_time(theirs, args.repeats) * 1e3
        print(f"| {n} | {context} | {a:.2f} | {b:.2f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
