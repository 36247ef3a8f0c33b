"""Speculative decoding on CPU: decode tokens/s without speculation, with n-gram lookup and with draft models.

    python benchmarks/speculative.py --target /work/bench/b1-Q4_K_M.gguf --draft /work/bench/b1-Q4_0.gguf \\
        --draft /work/bench/b1-Q4_K_M.gguf --pair /work/bench/b1-Q8_0.gguf:/work/bench/b1-Q4_0.gguf --bias 11,100

Every run decodes greedily from the same prompt, a random block of tokens repeated (an input a model can
copy: what n-gram lookup is for). The rate counts tokens after each sequence's first, timed from when every
sequence has its first token, so prefill is left out (`--clock cpu`: per second of the process's CPU time,
steadier than wall time on a shared machine). For each speculative run it reports the measured
acceptance rate α, the mean accepted length L (tokens a sequence gains per verification), the mean K used
(the engine backs K off when drafts fail), the draft's cost c (its plain decode time per token over the
target's) and the ideal speed-up for them, L / (1 + K c): what the run would gain if verifying K + 1 tokens
cost one plain decode step and nothing else cost time. achieved / ideal is what the engine loses to the
wider verification and its bookkeeping.
"""

# ruff: noqa: I001  (ember before torch: it sets OMP_WAIT_POLICY for its kernels' thread pool)
from __future__ import annotations

import ember  # noqa: F401
import argparse
import gc
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from ember.engine.engine import EngineArgs, LLMEngine
from ember.engine.speculator import acceptance
from ember.sampling_params import SamplingParams


def copy_prompt(length: int, repeats: int, seed: int = 0) -> list[int]:
    """A random block of ordinary token ids (past the control tokens, within any vocabulary, even a tiny test
    one), repeated."""
    block = torch.randint(16, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return block * repeats


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def decode_rate(engine: LLMEngine, prompt: list[int], params: SamplingParams, concurrency: int,
                tag: str, clock=time.perf_counter) -> tuple[float, dict]:
    """Decode tokens/s after the first token (per second of `clock`), and the spec_* counters of the run."""
    before = engine.stats()
    for i in range(concurrency):
        engine.add_request(f"{tag}-{i}", prompt, params)
    started: set[str] = set()
    while len(started) < concurrency:
        started.update(out.request_id for out in engine.step() if out.token_ids)
    start, generated = clock(), 0
    while engine.has_work():
        generated += sum(len(out.token_ids) for out in engine.step())
    seconds = clock() - start
    after = engine.stats()
    return generated / seconds, {k: after[k] - before.get(k, 0) for k in after if k.startswith("spec_")}


def ideal_speedup(mean_accepted_length: float, mean_k: float, cost: float) -> float:
    return mean_accepted_length / (1 + mean_k * cost)


def run(target: str, spec: dict, prompt: list[int], params: SamplingParams, concurrency: int,
        threads: int, clock=time.perf_counter) -> dict:
    engine = LLMEngine(target, EngineArgs(max_num_seqs=concurrency, threads=threads, max_model_len=1024, **spec))
    decode_rate(engine, prompt, replace(params, max_tokens=8), concurrency, "warmup")
    rate, counters = decode_rate(engine, prompt, params, concurrency, "timed", clock)
    del engine
    gc.collect()
    result = {"target": Path(target).name, "spec": spec, "concurrency": concurrency, "tokens_per_s": rate}
    measured = acceptance(counters) if counters else None
    if measured:
        result.update(alpha=measured[0], mean_accepted_length=measured[1],
                      mean_k=counters["spec_proposed_tokens"] / counters["spec_verifications"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="/work/bench/b1-Q4_K_M.gguf")
    parser.add_argument("--draft", action="append", default=[], help="a draft model for --target (repeatable)")
    parser.add_argument("--pair", action="append", default=[], metavar="TARGET:DRAFT",
                        help="another target and its draft, e.g. a quantization drafting for a finer one")
    parser.add_argument("--ngram", type=int, default=3)
    parser.add_argument("--spec-tokens", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per sequence")
    parser.add_argument("--concurrency", default="1", help="comma list of sequences decoded together")
    parser.add_argument("--prompt-block", type=int, default=32, help="random tokens repeated to make the prompt")
    parser.add_argument("--bias", default="", metavar="B,...",
                        help="also run n-gram (and each draft) with logit_bias B on one token, sampled at "
                             "temperature 1: a controlled acceptance rate for random-weight models (100: every "
                             "draft kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="what a second is: wall time, or the process's CPU time (all its threads), the "
                             "steadier measure on a machine other jobs share")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    prompt = copy_prompt(args.prompt_block, 3)
    k = args.spec_tokens
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    pairs = [(args.target, draft) for draft in args.draft] + [tuple(p.split(":", 1)) for p in args.pair]
    # (target, params label, params, speculation): the plain run of each target and params is the baseline.
    scenarios = [(args.target, "greedy", greedy, {"spec_ngram": args.ngram, "spec_tokens": k})]
    scenarios += [(target, "greedy", greedy, {"draft": draft, "spec_tokens": k}) for target, draft in pairs]
    for bias in [float(b) for b in args.bias.split(",") if b]:
        biased = SamplingParams(temperature=1.0, max_tokens=args.tokens, ignore_eos=True, seed=0,
                                logit_bias={prompt[0]: bias})
        scenarios.append((args.target, f"bias {bias:g}", biased, {"spec_ngram": args.ngram, "spec_tokens": k}))
        # The draft samples with the same bias: its proposals agree with the target as often as the bias makes
        # both repeat the token, whatever their weights.
        scenarios += [(target, f"bias {bias:g}", biased, {"draft": draft, "spec_tokens": k}) for target, draft in pairs]
    results, plain = [], {}

    def baseline(model: str, label: str, params: SamplingParams, concurrency: int) -> float:
        if (model, label, concurrency) not in plain:
            result = run(model, {}, prompt, params, concurrency, args.threads, CLOCKS[args.clock])
            result["params"] = label
            plain[(model, label, concurrency)] = result["tokens_per_s"]
            results.append(result)
            print(json.dumps(result), flush=True)
        return plain[(model, label, concurrency)]

    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        for target, label, params, spec in scenarios:
            base = baseline(target, label, params, concurrency)
            cost = base / baseline(spec["draft"], label, params, concurrency) if "draft" in spec else 0.0
            result = run(target, spec, prompt, params, concurrency, args.threads, CLOCKS[args.clock])
            result.update(params=label, speedup=result["tokens_per_s"] / base)
            if "alpha" in result:
                result["draft_cost"] = cost
                result["ideal_speedup"] = ideal_speedup(result["mean_accepted_length"], result["mean_k"], cost)
                result["of_ideal"] = result["speedup"] / result["ideal_speedup"]
            results.append(result)
            print(json.dumps(result), flush=True)
    print(f"\n{args.clock} clock\n\n| target | sampling | speculation | c | tok/s | speed-up | α | mean accepted len | mean K | "
          "draft cost c | ideal | achieved / ideal |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        spec = r["spec"]
        name = (f"n-gram {spec['spec_ngram']}, K={k}" if "spec_ngram" in spec else
                f"draft {Path(spec['draft']).name}, K={k}" if "draft" in spec else "none")
        cells = [r["target"], r["params"], name, str(r["concurrency"]), f"{r['tokens_per_s']:.2f}"]
        cells.append(f"{r['speedup']:.2f}×" if "speedup" in r else "")
        for key, fmt in (("alpha", "{:.2f}"), ("mean_accepted_length", "{:.2f}"), ("mean_k", "{:.1f}"),
                         ("draft_cost", "{:.2f}"),
                         ("ideal_speedup", "{:.2f}×"), ("of_ideal", "{:.0%}")):
            cells.append(fmt.format(r[key]) if key in r else "")
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
