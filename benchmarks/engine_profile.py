"""Where an engine decode step spends its time: torch.profiler table plus Python-side phases.

    python benchmarks/engine_profile.py /work/bench-1b-Q8_0.gguf --batch 1,16 --steps 8

For each batch size: fills B sequences with prompts (prefill, not timed), then runs N decode steps through
`LLMEngine.step()` with the phases timed separately (scheduler, input preparation, model forward, logits,
sampling, detokenize/stop checks), and prints torch.profiler's table of the same steps sorted by self CPU time.
The native kernel calls are timed too, by kind (each matrix product by its K -> N shape, decode attention, the
whole native decode stack): what is left of the forward is the Python/torch glue. Every time is given as wall
time and as the main thread's CPU time; with `--threads 1` all the work runs on the main thread, so its CPU
time is the step's work whatever else loads the machine (wall times move with the load).
`EMBER_NATIVE_DECODE=0` profiles the module-by-module path instead of the native decode stack.
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
from ember.kernels import decode_layers, matmul
from ember.layers import attention as attention_layer
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


class _Clock:
    """Wall and main-thread CPU milliseconds, summed by name over one step; `current` is the one being filled."""

    current: _Clock | None = None

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name] += wall * 1e3
        self.cpu[name] += cpu * 1e3

    @staticmethod
    def wrap(owner, attr: str, name_of) -> None:
        """Time every call of owner.attr, under name_of(*args), into the current clock."""
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                if _Clock.current is not None:
                    _Clock.current.add(name_of(*args), time.perf_counter() - w, time.thread_time() - c)

        setattr(owner, attr, timed)


PHASES = ("schedule", "prepare inputs", "model forward", "logits", "bookkeeping+sampling", "detokenize+stop")


def _timed_step(engine: LLMEngine, clock: _Clock) -> None:
    """engine.step() split into its phases (same calls, same order)."""
    marks = []

    def mark():
        marks.append((time.perf_counter(), time.thread_time()))

    with torch.inference_mode():
        mark()
        chunks = engine.scheduler.schedule()
        mark()
        ids, pos, meta, plan, sampled = engine.runner._build(chunks)
        mark()
        hidden = engine.runner.model(ids, pos, meta)
        mark()
        logits = engine.runner.model.compute_logits(hidden if plan.rows is None else hidden[plan.rows])
        mark()
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            engine.block_manager.register_computed(chunk.seq)
        requests = [engine.requests[c.seq.request_id] for c in sampled]
        tokens, logprobs = engine.sampler(logits, [r.sampling for r in requests])
        mark()
        for r, t, lp in zip(requests, tokens, logprobs, strict=True):
            engine._advance(r, [t], [lp] if lp else None)
        mark()
    for name, (w0, c0), (w1, c1) in zip(PHASES, marks[:-1], marks[1:], strict=True):
        clock.add(name, w1 - w0, c1 - c0)


def _instrument() -> None:
    _Clock.wrap(matmul.NativeMatmul, "__call__", lambda self, *a: f"matmul K={self.in_features} N={self.out_features}")
    _Clock.wrap(attention_layer, "decode_attention", lambda *a: "decode attention")  # the layers' own name
    _Clock.wrap(decode_layers.DecodeLayers, "__call__", lambda *a: "native decode stack")


def profile_batch(engine: LLMEngine, batch: int, prompt_len: int, steps: int, rows: int) -> None:
    """rows=0: phase timings only, no torch.profiler table."""
    _fill(engine, batch, prompt_len, f"b{batch}")
    engine.step()  # warm-up decode
    clocks = []
    for _ in range(steps):
        clocks.append(_Clock())
        _Clock.current = clocks[-1]
        _timed_step(engine, clocks[-1])
    _Clock.current = None
    walls = [sum(c.wall[n] for n in PHASES) for c in clocks]
    # Other jobs on the machine add stalls to some steps: the minimum is the least disturbed estimate.
    wall, best = statistics.median(walls), min(walls)
    print(f"\n=== batch {batch}: {steps} decode steps, median {wall:.1f} ms/step ({batch * 1e3 / wall:.1f} tok/s), "
          f"min {best:.1f} ms/step ({batch * 1e3 / best:.1f} tok/s) ===")
    print(f"  {'':28s} {'wall ms':>9s} {'cpu ms':>9s}   (medians over the steps; cpu: the main thread's)")
    kernels = sorted(n for n in clocks[0].wall if n not in PHASES)
    for name in PHASES + ("native kernel calls (in forward and logits):",) + tuple(kernels):
        if name.endswith(":"):
            print(f"  {name}")
            continue
        w = statistics.median(c.wall[name] for c in clocks)
        cpu = statistics.median(c.cpu[name] for c in clocks)
        print(f"  {name:28s} {w:9.2f} {cpu:9.2f}")
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
    _instrument()
    for batch in batches:
        profile_batch(engine, batch, args.prompt_len, args.steps, args.rows)


if __name__ == "__main__":
    main()
