"""Where an engine decode step spends its time: torch.profiler table plus Python-side phases.

    python benchmarks/engine_profile.py /work/bench-1b-Q8_0.gguf --batch 1,16 --steps 8

For each batch size: fills B sequences with prompts (prefill, not timed), then runs N decode steps through
`LLMEngine.step()` with the phases timed separately (scheduler, input preparation, model forward, logits,
sampling, detokenize/stop checks), and prints torch.profiler's table of the same steps sorted by self CPU time.
"""

# ruff: noqa: I001  (ember before torch: it sets OMP_WAIT_POLICY for its kernels' thread pool)
from __future__ import annotations

import ember  # noqa: F401
import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from ember.engine.engine import EngineArgs, LLMEngine
from ember.sampling_params import SamplingParams


def _fill(engine: LLMEngine, batch: int, prompt_len: int, tag: str) -> None:
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    generator = torch.Generator().manual_seed(batch)
    vocab = engine.loaded.config.vocab_size
    for i in range(batch):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=generator).tolist()
        engine.add_request(f"{tag}-{i}", prompt, params)
    # Prefill until every sequence decodes (each has produced its first token).
    while any(r.seq.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()


def _timed_step(engine: LLMEngine, times: dict[str, list[float]]) -> None:
    """engine.step() split into its phases (same calls, same order)."""
    clock = time.perf_counter
    with torch.inference_mode():
        t0 = clock()
        chunks = engine.scheduler.schedule()
        t1 = clock()
        ids, pos, meta, plan, sampled = engine.runner._build(chunks)
        t2 = clock()
        hidden = engine.runner.model(ids, pos, meta)
        t3 = clock()
        logits = engine.runner.model.compute_logits(hidden if plan.rows is None else hidden[plan.rows])
        t4 = clock()
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            engine.block_manager.register_computed(chunk.seq)
        requests = [engine.requests[c.seq.request_id] for c in sampled]
        tokens, logprobs = engine.sampler(logits, [r.sampling for r in requests])
        t5 = clock()
        for r, t, lp in zip(requests, tokens, logprobs, strict=True):
            engine._advance(r, [t], [lp] if lp else None)
        t6 = clock()
    for name, value in (("schedule", t1 - t0), ("prepare inputs", t2 - t1), ("model forward", t3 - t2),
                        ("logits", t4 - t3), ("bookkeeping+sampling", t5 - t4), ("detokenize+stop", t6 - t5)):
        times[name].append(value * 1e3)


def profile_batch(engine: LLMEngine, batch: int, prompt_len: int, steps: int, rows: int) -> None:
    """rows=0: phase timings only, no torch.profiler table."""
    _fill(engine, batch, prompt_len, f"b{batch}")
    engine.step()  # warm-up decode
    times: dict[str, list[float]] = defaultdict(list)
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        _timed_step(engine, times)
        walls.append((time.perf_counter() - start) * 1e3)
    # Other jobs on the machine add stalls to some steps: the minimum is the least disturbed estimate.
    wall, best = statistics.median(walls), min(walls)
    print(f"\n=== batch {batch}: {steps} decode steps, median {wall:.1f} ms/step ({batch * 1e3 / wall:.1f} tok/s), "
          f"min {best:.1f} ms/step ({batch * 1e3 / best:.1f} tok/s) ===")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:22s} median {median:8.2f} ms  ({100 * median / wall:5.1f}%)  min {min(values):8.2f} ms")
    if rows:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    for request_id in list(engine.requests):
        engine.abort(request_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", default="1,16", help="comma list of batch sizes")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kv-memory", type=int, default=1 << 30)
    parser.add_argument("--rows", type=int, default=25, help="rows of the profiler table (0: none)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = LLMEngine(args.model, EngineArgs(dtype=args.dtype, kv_memory=args.kv_memory,
                                              max_num_seqs=max(batches), max_batched_tokens=2048))
    for batch in batches:
        profile_batch(engine, batch, args.prompt_len, args.steps, args.rows)


if __name__ == "__main__":
    main()
