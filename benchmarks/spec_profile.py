"""Where a decode step's time goes, plain and speculative: per-phase wall and CPU milliseconds per step.

    python benchmarks/spec_profile.py --target /work/bench/b1-Q4_K_M.gguf --concurrency 1 --bias 100
    python benchmarks/spec_profile.py --target /work/bench/b1-Q8_0.gguf --draft /work/bench/b1-Q4_0.gguf

Runs the same requests twice in one process, without speculation and with it (n-gram lookup, or --draft),
and wraps the engine's phases with timers: scheduling, drafting (`_speculate`, which holds the draft model's
forwards), the target's forward (split into the quantized matmuls, the attention kernel, the K/V write and
the rest: norms, rotary, residuals), logits, plain sampling, verification, advancing the sequences
(detokenization and stop checks), and rollback of the rejected drafts' KV slots. Phases nest (the forward
holds the matmuls): `rest of forward` is the forward less its timed parts, `other` the step less its phases.
Wall time is noisy on a shared machine; CPU time (`time.process_time`, every thread of the process) is the
steadier figure there. Steps are counted after each sequence's first token (prefill is left out).
"""

# ruff: noqa: I001  (ember before torch: it sets OMP_WAIT_POLICY for its kernels' thread pool)
from __future__ import annotations

import ember  # noqa: F401
import argparse
import functools
import gc
import time
from collections import defaultdict
from dataclasses import replace

import torch

from ember.engine.engine import EngineArgs, LLMEngine
from ember.engine.speculator import acceptance
from ember.kernels.matmul import NativeMatmul
from ember.layers import attention
from ember.sampling_params import SamplingParams

from speculative import copy_prompt  # noqa: E402  (benchmarks/ is the script's folder)


class Timers:
    """Exclusive (self) time per label: a phase's time less the time of the phases timed inside it, so the
    labels add up to the step. A phase timed inside drafting is labelled "draft: ..." (the draft model's
    matmuls are not the target's)."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [label, children's wall, children's cpu]
        self.on = False

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if not self.on:
                return original(*args, **kwargs)
            inside_draft = any(entry[0] == DRAFT for entry in self.stack)
            entry = [f"draft: {label}" if inside_draft and label != DRAFT else label, 0.0, 0.0]
            self.stack.append(entry)
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                self.stack.pop()
                self.wall[entry[0]] += wall - entry[1]
                self.cpu[entry[0]] += cpu - entry[2]
                if self.stack:
                    self.stack[-1][1] += wall
                    self.stack[-1][2] += cpu

        setattr(owner, name, timed)


DRAFT = "drafting (rest: lookup, draft sampling, shadow sync)"
FORWARD = "forward (rest: norms, rotary, residuals, inputs)"
KERNELS = ["matmuls", "attention kernel", "K/V write", FORWARD, "logits (rest)"]
STEP = "step (rest: bookkeeping)"
# Display order; every label is exclusive time.
PHASES = ["schedule", DRAFT, *[f"draft: {label}" for label in KERNELS], *KERNELS, "sampling (plain rows)",
          "accept/reject (speculator.verify)", "rollback (block_manager.truncate)", "verification (rest)",
          "advance (detok, stop checks)", STEP]


def instrument(engine: LLMEngine, timers: Timers) -> None:
    timers.wrap(engine, "step", STEP)
    timers.wrap(engine.scheduler, "schedule", "schedule")
    timers.wrap(engine, "_speculate", DRAFT)
    timers.wrap(engine.runner, "run", FORWARD)
    timers.wrap(engine.loaded.model, "compute_logits", "logits (rest)")
    timers.wrap(engine, "sampler", "sampling (plain rows)")
    timers.wrap(engine, "_verify", "verification (rest)")
    timers.wrap(engine.block_manager, "truncate", "rollback (block_manager.truncate)")
    timers.wrap(engine, "_advance", "advance (detok, stop checks)")
    if engine.speculator is not None:
        timers.wrap(engine.speculator, "verify", "accept/reject (speculator.verify)")
        if engine.speculator.draft is not None:
            timers.wrap(engine.speculator.draft.runner, "run", FORWARD)
            timers.wrap(engine.speculator.draft.runner.model, "compute_logits", "logits (rest)")


def instrument_classes(timers: Timers) -> None:
    """Class-level wraps (every model in the process): inside drafting they are the draft model's."""
    timers.wrap(NativeMatmul, "__call__", "matmuls")
    timers.wrap(attention.Attention, "_decode", "attention kernel")  # ember/kernels/attention.c
    timers.wrap(attention.Attention, "_prefill", "attention kernel")  # causal_attention.c (prefill chunks)
    timers.wrap(attention.Attention, "_write", "K/V write")


def profile(engine: LLMEngine, timers: Timers, prompt: list[int], params: SamplingParams, concurrency: int,
            tag: str) -> tuple[int, int, dict, dict, dict]:
    """(steps, tokens, wall by phase, cpu by phase, spec counters) over the decode steps of one run."""
    for i in range(concurrency):
        engine.add_request(f"{tag}-{i}", prompt, params)
    started: set[str] = set()
    while len(started) < concurrency:
        started.update(out.request_id for out in engine.step() if out.token_ids)
    before = engine.stats()
    timers.wall.clear()
    timers.cpu.clear()
    timers.on = True
    steps = tokens = 0
    while engine.has_work():
        tokens += sum(len(out.token_ids) for out in engine.step())
        steps += 1
    timers.on = False
    after = engine.stats()
    counters = {k: after[k] - before.get(k, 0) for k in after if k.startswith("spec_")}
    return steps, tokens, dict(timers.wall), dict(timers.cpu), counters


def table(rows: list[tuple[str, int, int, dict, dict]]) -> str:
    """Per-step ms of each phase, a (wall, cpu) column pair per run; phases no run has are left out."""
    head = "| phase | " + " | ".join(f"{name} wall ms | {name} cpu ms" for name, *_ in rows) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(rows)]
    for label in ["step (total)", *PHASES]:
        if label != "step (total)" and not any(label in wall for *_, wall, _ in rows):
            continue
        cells = []
        for _, steps, _, wall, cpu in rows:
            for times in (wall, cpu):
                value = sum(times.values()) if label == "step (total)" else times.get(label, 0.0)
                cells.append(f"{1000 * value / steps:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| tokens per step | " + " | ".join(f"{tokens / steps:.2f} | " for _, steps, tokens, _, _ in rows)
                 + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="/work/bench/b1-Q4_K_M.gguf")
    parser.add_argument("--draft", help="a draft model (default: n-gram lookup)")
    parser.add_argument("--ngram", type=int, default=3)
    parser.add_argument("--spec-tokens", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--bias", type=float, help="sample at temperature 1 with this logit bias on one prompt "
                                                   "token (a known acceptance for random weights), else greedy")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=1, help="alternate plain and speculative runs this often")
    args = parser.parse_args()

    prompt = copy_prompt(32, 3)
    if args.bias is None:
        params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    else:
        params = SamplingParams(temperature=1.0, max_tokens=args.tokens, ignore_eos=True, seed=0,
                                logit_bias={prompt[0]: args.bias})
    spec = {"draft": args.draft} if args.draft else {"spec_ngram": args.ngram}
    timers = Timers()
    instrument_classes(timers)
    engines = {}
    for name, extra in (("plain", {}), ("spec", {**spec, "spec_tokens": args.spec_tokens})):
        engine = LLMEngine(args.target, EngineArgs(max_num_seqs=args.concurrency, threads=args.threads,
                                                   max_model_len=1024, **extra))
        instrument(engine, timers)
        profile(engine, timers, prompt, replace(params, max_tokens=8), args.concurrency, "warmup")
        engines[name] = engine
    totals: dict[str, list] = {name: [name, 0, 0, defaultdict(float), defaultdict(float)] for name in engines}
    counters: dict = defaultdict(int)
    for round_index in range(args.rounds):
        for name, engine in engines.items():  # interleaved: both runs see the same machine load
            steps, tokens, wall, cpu, spec_counters = profile(engine, timers, prompt, params, args.concurrency,
                                                              f"r{round_index}")
            entry = totals[name]
            entry[1] += steps
            entry[2] += tokens
            for key, value in wall.items():
                entry[3][key] += value
            for key, value in cpu.items():
                entry[4][key] += value
            for key, value in spec_counters.items():
                counters[key] += value
        gc.collect()
    rows = [tuple(entry) for entry in totals.values()]
    print(table(rows))
    plain, spec_run = totals["plain"], totals["spec"]
    for label, index in (("wall", 3), ("cpu", 4)):
        plain_rate = plain[2] / sum(plain[index].values())
        spec_rate = spec_run[2] / sum(spec_run[index].values())
        print(f"{label}: plain {plain_rate:.2f} tok/s, speculative {spec_rate:.2f} tok/s, "
              f"speed-up {spec_rate / plain_rate:.2f}x")
    measured = acceptance(counters)
    if measured:
        mean_k = counters["spec_proposed_tokens"] / counters["spec_verifications"]
        print(f"alpha {measured[0]:.2f}, mean accepted length {measured[1]:.2f}, mean K {mean_k:.2f}")


if __name__ == "__main__":
    main()
