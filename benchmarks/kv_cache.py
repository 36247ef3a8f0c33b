"""The int8 KV cache (--kv-cache-dtype int8, docs/kv-cache.md) against the default one: quality, memory, speed.

    # teacher-forced log-probabilities of a prompt, int8 vs auto cache (real text: this repo's docs), and
    # the same for a cache perturbed by 1e-5 relative noise (the metric's floor on this model)
    python benchmarks/kv_cache.py quality /work/bench/b1-Q4_K_M.gguf --length 2048 --floor 1e-5
    python benchmarks/kv_cache.py quality /work/bench/b1-Q4_K_M.gguf --length 2048 --random
    python benchmarks/kv_cache.py quality ember-default --length 1000
    # bytes per token of the allocated cache, and 2K-token sequences a fixed --kv-memory holds
    python benchmarks/kv_cache.py memory /work/bench/b1-Q4_K_M.gguf --kv-memory 1G
    # decode tokens/s of 16 sequences over a shared 1K-token prefix, A/B interleaved, medians
    python benchmarks/kv_cache.py speed /work/bench/b1-Q4_K_M.gguf --seqs 16 --context 1024 --repeat 3
    # the native decode attention kernel alone (one layer of the 1.1B's shapes), float32 vs int8 cache
    python benchmarks/kv_cache.py kernel --seqs 16 --context 2048

quality: one engine per cache, the prompt scored (prompt_logprobs) in --chunk-token steps; |Δ logprob| of each
prompt token, over every position and over those past the first chunk (a fresh prompt's first chunk attends its
own unquantized K/V; every later chunk, and every decode step, reads the quantized cache).
speed: the first sequence prefills the prefix, the others then hit the prefix cache (one block each to fill),
and the timed part is decode only; runs alternate auto/int8 (the order flips each repetition). The load
average is printed: the machine may be shared.
"""

# ruff: noqa: I001  (ember before torch: it sets OMP_WAIT_POLICY for its kernels' thread pool)
from __future__ import annotations

import ember  # noqa: F401
import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch

from ember.cli.options import _size
from ember.engine.engine import EngineArgs, LLMEngine, load_named_model
from ember.layers.attention import Attention
from ember.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
CACHES = ("auto", "int8")


def _load(model: str, dtype: str = "auto"):
    reference = None if model == "ember-default" else model
    return load_named_model(reference, EngineArgs(dtype=dtype, device="cpu"))


def _engine(loaded, **args) -> LLMEngine:
    """A fresh engine on the loaded weights (each engine's runner points the layers at its own cache)."""
    return LLMEngine(loaded.name, EngineArgs(device="cpu", **args), loaded=loaded)


def _real_text_ids(engine: LLMEngine, length: int) -> list[int]:
    text = "\n\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    ids = engine.tokenizer.encode(text)
    if len(ids) < length:
        raise SystemExit(f"the docs hold only {len(ids)} tokens")
    return ids[:length]


@contextlib.contextmanager
def _perturbed_writes(floor: str):
    """Every K/V written to the cache multiplied by (1 + floor * N(0, 1)), or for floor "bf16" rounded to
    bfloat16 (a bf16 cache, simulated in a float32 one): how far a perturbation moves this model."""
    write = Attention._write
    generator = torch.Generator().manual_seed(2)

    def perturb(x):
        if floor == "bf16":
            return x.bfloat16().to(x.dtype)
        return x * (1 + float(floor) * torch.randn(x.shape, generator=generator))

    def noisy(self, k, v, slots):
        write(self, perturb(k), perturb(v), slots)

    Attention._write = noisy
    try:
        yield
    finally:
        Attention._write = write


def quality(args) -> None:
    loaded = _load(args.model, args.dtype)
    logprobs = {}
    perturbed = "auto, K/V rounded to bf16" if args.floor == "bf16" else f"auto, K/V x (1 + {args.floor} N(0,1))"
    runs = [*CACHES, *([perturbed] if args.floor else [])]
    for cache in runs:
        engine = _engine(loaded, dtype=args.dtype, kv_cache_dtype=cache if cache in CACHES else "auto",
                         max_model_len=args.length + 8,
                         max_num_seqs=1, max_batched_tokens=args.chunk, kv_memory=None)
        if args.random:
            prompt = torch.randint(3, engine.vocab_size, (args.length,), generator=torch.Generator().manual_seed(0))
            prompt = prompt.tolist()
        else:
            prompt = _real_text_ids(engine, args.length)
        engine.add_request(cache, prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
        started = time.perf_counter()
        with _perturbed_writes(args.floor) if cache not in CACHES else contextlib.nullcontext():
            while engine.has_work():
                for out in engine.step():
                    if out.prompt_logprobs is not None:
                        logprobs[cache] = [lp.logprob for lp in out.prompt_logprobs[1:]]
        print(f"{cache}: scored {args.length} tokens in {time.perf_counter() - started:.1f} s")
    print(f"mean logprob of the prompt's tokens (auto cache): {statistics.mean(logprobs['auto']):.3f}")
    # Against the auto (activation-dtype) cache; with --floor, int8 also against the perturbed run (with
    # --floor bf16: a bf16 cache, the reference).
    pairs = [("auto", other) for other in runs[1:]] + ([(runs[2], "int8")] if args.floor else [])
    for reference, other in pairs:
        deltas = [abs(a - b) for a, b in zip(logprobs[reference], logprobs[other], strict=True)]
        past = deltas[args.chunk - 1:]  # prompt_logprobs[1:]: index i scores token i + 1
        for name, values in (("all positions", deltas), (f"positions >= {args.chunk}", past)):
            values = sorted(values)
            print(f"{other} vs {reference}, {name:18s} n={len(values):5d}  |Δ logprob| median "
                  f"{statistics.median(values):.4f}  p90 {values[int(len(values) * 0.9)]:.4f}  max {values[-1]:.4f}")


def memory(args) -> None:
    block = 16
    per_sequence = -(-args.sequence // block)
    print(f"--kv-memory {args.kv_memory / 2**30:.2f} GiB, {args.sequence}-token sequences")
    for dtype, cache in (("auto", "auto"), ("bfloat16", "auto"), ("auto", "int8"), ("bfloat16", "int8")):
        loaded = _load(args.model, dtype)
        engine = _engine(loaded, dtype=dtype, kv_cache_dtype=cache, kv_memory=args.kv_memory, block_size=block)
        slots = engine.num_blocks * block
        print(f"--dtype {dtype:8s} --kv-cache-dtype {cache:4s}: cache {engine.runner.kv_cache_bytes / 2**20:8.1f} "
              f"MiB allocated, {engine.runner.kv_cache_bytes / slots:7.0f} bytes/token "
              f"({str(engine.runner.k_cache.dtype).removeprefix('torch.')}), {slots} tokens, "
              f"{engine.num_blocks // per_sequence} concurrent {args.sequence}-token sequences")
        del engine, loaded


def _decode_rate(loaded, cache: str, args) -> float:
    engine = _engine(loaded, kv_cache_dtype=cache, max_num_seqs=args.seqs, max_model_len=args.context + args.steps + 8,
                     kv_memory=None)
    prefix = torch.randint(3, engine.vocab_size, (args.context,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=args.steps + 2, temperature=0, ignore_eos=True)
    engine.add_request("0", prefix + [3], params)
    while engine.requests["0"].seq.num_output_tokens == 0:
        engine.step()  # the prefix's blocks are now cached: the others reuse them
    for i in range(1, args.seqs):
        engine.add_request(str(i), prefix + [3 + i], params)
    while any(r.seq.num_output_tokens < 2 for r in engine.requests.values()):
        engine.step()
    tokens, started = 0, time.perf_counter()
    while engine.has_work():
        tokens += len(engine.step())
    return tokens / (time.perf_counter() - started)


def speed(args) -> None:
    loaded = _load(args.model)
    rates = {cache: [] for cache in CACHES}
    print(f"load average before: {os.getloadavg()}")
    for rep in range(args.repeat):
        for cache in CACHES if rep % 2 == 0 else reversed(CACHES):
            rates[cache].append(_decode_rate(loaded, cache, args))
            print(f"  rep {rep} {cache:4s}: {rates[cache][-1]:6.2f} tokens/s  (load {os.getloadavg()[0]:.2f})")
    auto, int8 = statistics.median(rates["auto"]), statistics.median(rates["int8"])
    print(f"{args.seqs} sequences, {args.context}-token context, {args.steps} decode steps, "
          f"{torch.get_num_threads()} threads: median auto {auto:.2f}, int8 {int8:.2f} tokens/s "
          f"(int8/auto {int8 / auto:.3f}); load average after: {os.getloadavg()}")


def kernel(args) -> None:
    """The native decode attention alone, float32 vs int8 cache, on the 1.1B model's shapes (32 query heads, 4
    KV heads of 64): `--seqs` sequences of `--context` tokens on scattered 16-token blocks, interleaved."""
    from ember.kernels.attention import decode_attention
    from ember.layers import kv_cache

    heads, kv_heads, head_dim, block = 32, 4, 64, 16
    per_seq = -(-args.context // block)
    slots = args.seqs * per_seq * block
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(slots, kv_heads, head_dim, generator=gen), torch.randn(slots, kv_heads, head_dim, generator=gen)
    (kq, ks), (vq, vs) = kv_cache.quantize(k), kv_cache.quantize(v)
    blocks = torch.randperm(args.seqs * per_seq, generator=gen)
    lens = torch.full((args.seqs,), args.context)
    q = torch.randn(args.seqs, heads, head_dim, generator=gen)
    caches = {"auto": (k, v, None, None), "int8": (kq, vq, ks, vs)}
    times = {cache: [] for cache in CACHES}
    for rep in range(args.repeat * 20):
        for cache in CACHES if rep % 2 == 0 else reversed(CACHES):
            kc, vc, kscale, vscale = caches[cache]
            started = time.perf_counter()
            out = decode_attention(q, kc, vc, lens, blocks, 0, block, head_dim**-0.5, None, None, kscale, vscale)
            times[cache].append(time.perf_counter() - started)
            assert out is not None, "the native kernels are not available here"
    auto, int8 = statistics.median(times["auto"]), statistics.median(times["int8"])
    print(f"decode attention, {args.seqs} x {args.context} tokens, one layer, {torch.get_num_threads()} threads: "
          f"median auto {auto * 1e3:.3f} ms, int8 {int8 * 1e3:.3f} ms (int8/auto time {int8 / auto:.3f}); "
          f"load average {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("model")
    q.add_argument("--length", type=int, default=2048)
    q.add_argument("--chunk", type=int, default=256, help="prefill tokens per step")
    q.add_argument("--random", action="store_true", help="random token ids instead of the repo's docs")
    q.add_argument("--dtype", default="auto", help="activation dtype (auto: float32 on CPU)")
    q.add_argument("--floor", default=None, metavar="REL|bf16",
                   help="also score with an auto cache whose K/V carry relative noise REL (e.g. 1e-5), or are "
                        "rounded to bf16: how much any perturbation of the cache moves this model")
    m = sub.add_parser("memory")
    m.add_argument("model")
    m.add_argument("--kv-memory", type=_size, default=2**30)
    m.add_argument("--sequence", type=int, default=2048)
    s = sub.add_parser("speed")
    s.add_argument("model")
    s.add_argument("--seqs", type=int, default=16)
    s.add_argument("--context", type=int, default=1024)
    s.add_argument("--steps", type=int, default=16)
    s.add_argument("--repeat", type=int, default=3)
    k = sub.add_parser("kernel")
    k.add_argument("--seqs", type=int, default=16)
    k.add_argument("--context", type=int, default=2048)
    k.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    {"quality": quality, "memory": memory, "speed": speed, "kernel": kernel}[args.command](args)


if __name__ == "__main__":
    main()
