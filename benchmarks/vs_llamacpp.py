"""ember vs llama.cpp on the same GGUF files, one after the other on this machine: a markdown table of ratios.

    python benchmarks/vs_llamacpp.py --llama-bench $LLAMA_CPP/build/bin/llama-bench -t 2 -r 3 \\
        $W/b1-Q4_0.gguf $W/b1-Q4_K_M.gguf $W/b1-Q6_K.gguf $W/b1-Q8_0.gguf $W/b1-bf16.gguf

For each file: prefill (pp, `-p N -n 0`) and single-stream decode (tg, `-p 0 -n N`) with `llama-bench` and with
`ember bench` (the same test names and repetitions, one stream), then batched decode with ember at the
concurrencies of `--batch` (aggregate tokens/s, compared with llama.cpp's single stream). The tools run one at a
time: two thread pools on the same cores would slow each other. Prints the CPU model and ISA flags first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import ember
from ember.bench.hardware import detect
from ember.kernels import native


def llama_bench(binary: str, model: Path, threads: int, reps: int, prompt: int, gen: int) -> float:
    # llama.cpp's own OpenMP settings, not the OMP_WAIT_POLICY=PASSIVE that importing ember set for this process
    # (passive waits cost llama.cpp a third of its decode speed here)
    env = {k: v for k, v in os.environ.items() if not (k == "OMP_WAIT_POLICY" and ember.OMP_SET_BY_EMBER)}
    out = subprocess.run([binary, "-m", str(model), "-t", str(threads), "-r", str(reps), "-p", str(prompt),
                          "-n", str(gen), "-o", "json"], capture_output=True, text=True, check=True, env=env).stdout
    return float(json.loads(out)[0]["avg_ts"])


def ember_bench(model: Path, threads: int, reps: int, prompt: int, gen: int, concurrency: int = 1) -> float:
    out = subprocess.run([sys.executable, "-m", "ember.cli.main", "bench", str(model), "-t", str(threads),
                          "-r", str(reps), "-p", str(prompt), "-n", str(gen), "-c", str(concurrency),
                          "--output", "json"], capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)["results"][0]["tokens_per_s_mean"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("--batch", default="16", help="comma list of concurrencies for ember's batched decode")
    args = ap.parse_args()
    hw = detect()
    print(f"CPU: {hw.cpu_model}, {hw.physical_cores} cores, {' '.join(hw.cpu_features)}; "
          f"ember kernels: {native.isa()}; {args.threads} threads\n")
    batches = [int(b) for b in args.batch.split(",") if b]
    print("| model | test | llama.cpp t/s | ember t/s | ember / llama.cpp |")
    print("|---|---|---:|---:|---:|")
    for model in args.models:
        # -p 0 or -n 0 leaves that test out (llama-bench reports nothing for a 0-token test)
        tests = [(f"pp{args.n_prompt}", args.n_prompt, 0), (f"tg{args.n_gen}", 0, args.n_gen)]
        for name, p, n in (t for t in tests if t[1] or t[2]):
            ref = llama_bench(args.llama_bench, model, args.threads, args.repetitions, p, n)
            ours = ember_bench(model, args.threads, args.repetitions, p, n)
            print(f"| {model.name} | {name} | {ref:.1f} | {ours:.1f} | {ours / ref:.2f} |", flush=True)
            if n:
                for c in batches:
                    agg = ember_bench(model, args.threads, args.repetitions, 0, n, c)
                    print(f"| {model.name} | {name} c={c} (aggregate, vs llama.cpp one stream) | {ref:.1f} | "
                          f"{agg:.1f} | {agg / ref:.2f} |", flush=True)


if __name__ == "__main__":
    main()
