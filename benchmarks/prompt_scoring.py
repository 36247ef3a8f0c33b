"""What scoring a prompt (lm-evaluation-harness' echo + logprobs) costs over plain prefill.

    python benchmarks/prompt_scoring.py /work/bench/b1-Q4_K_M.gguf --length 512 --repeat 3

Times one request per mode through `LLMEngine`, on fresh prompts (no prefix-cache hits): prefill + one token,
and prompt_logprobs with max_tokens 0 (logits and log_softmax at every prompt position). Prints the median.
"""

# ruff: noqa: I001  (ember before torch: it sets OMP_WAIT_POLICY for its kernels' thread pool)
from __future__ import annotations

import ember  # noqa: F401
import argparse
import statistics
import time

import torch

from ember.engine.engine import EngineArgs, LLMEngine
from ember.sampling_params import SamplingParams

MODES = {"prefill + 1 token": SamplingParams(temperature=0, max_tokens=1),
         "score the prompt (max_tokens 0)": SamplingParams(max_tokens=0, prompt_logprobs=1)}


def _run(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams) -> float:
    started = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    while engine.has_work():
        engine.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    engine = LLMEngine(args.model, EngineArgs(max_model_len=args.length + 16, max_num_seqs=1))
    vocab = engine.loaded.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    for name, params in MODES.items():
        times = []
        for i in range(args.repeat):
            prompt = torch.randint(3, vocab, (args.length,), generator=generator).tolist()
            times.append(_run(engine, f"{name}-{i}", prompt, params))
        median = statistics.median(times)
        print(f"{name:32s} {median * 1e3:8.1f} ms  ({args.length / median:7.1f} prompt tokens/s)")


if __name__ == "__main__":
    main()
