"""CPU time of whole batched decode steps, which a busy machine does not distort the way it does wall time.

    python benchmarks/decode_step_cpu.py /work/bench/b1-Q4_K_M.gguf --batch 16 --steps 16

Runs `--batch` sequences of short prompts through `LLMEngine` with one kernel thread (the default), then times
`--steps` decode steps with `time.process_time()`: CPU seconds of this process, so time other jobs hold the cores
is not counted (their cache and memory traffic still is). To compare two versions, run it with PYTHONPATH on each
tree in turn, alternating (old one: `git archive REV ember | tar -x -C /tmp/old`).
"""

# ruff: noqa: I001  (ember before torch: it sets OMP_WAIT_POLICY for its kernels' thread pool)
from __future__ import annotations

import ember  # noqa: F401
import argparse
import time

from ember.engine.engine import EngineArgs, LLMEngine
from ember.sampling_params import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed")
    p.add_argument("--threads", type=int, default=1, help="kernel threads (1: CPU time equals work done)")
    p.add_argument("--prompt-len", type=int, default=8)
    args = p.parse_args()
    engine = LLMEngine(args.model, EngineArgs(threads=args.threads, max_num_seqs=args.batch, max_model_len=512))
    params = SamplingParams(temperature=0, max_tokens=args.steps + 8, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(f"s{i}", [100 + 7 * i + j for j in range(args.prompt_len)], params)
    while any(r.seq.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()  # prefill, not timed
    engine.step()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{args.model}: {args.batch} sequences, {args.threads} thread(s): {cpu / args.steps * 1e3:.1f} ms CPU per "
          f"step, {args.batch * args.steps / cpu:.1f} tokens per CPU-second (wall {wall / args.steps * 1e3:.0f} ms "
          f"per step)")


if __name__ == "__main__":
    main()
