"""`ember bench MODEL`: prompt-processing and generation throughput of the engine itself, like llama-bench.

Two kinds of test, each run with `concurrency` sequences at once:
  ppN  every sequence prefills N random prompt tokens and samples one token; rate = prompt tokens / time.
  tgN  every sequence starts from one random token and generates N tokens with EOS ignored; rate =
       generated tokens / time (each step is one single-token forward, as llama-bench's tg measures).
Prompts are fresh random ids on every repetition, so the prefix cache never turns a run into a lookup.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.engine.engine import LLMEngine
from ember.engine.speculator import acceptance
from ember.loader.model import LoadedModel
from ember.sampling_params import SamplingParams

# Random prompts avoid the lowest ids, where vocabularies keep BOS/EOS/padding and other control tokens.
FIRST_ORDINARY_ID = 16


@dataclass
class TestSpec:
    kind: str  # "pp" | "tg"
    tokens: int
    concurrency: int
    threads: int

    @property
    def name(self) -> str:
        return f"{self.kind}{self.tokens}"


@dataclass
class TestResult:
    spec: TestSpec
    samples: list[float] = field(default_factory=list)  # tokens/s of each repetition
    preemptions: int = 0  # KV cache pressure during the timed runs; should be 0 for clean figures
    speculation: dict | None = None  # spec_* counters of the timed runs, when the engine speculates

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    def to_dict(self) -> dict:
        return {
            "test": self.spec.name, "n_prompt": self.spec.tokens if self.spec.kind == "pp" else 0,
            "n_gen": self.spec.tokens if self.spec.kind == "tg" else 0, "concurrency": self.spec.concurrency,
            "threads": self.spec.threads, "repetitions": len(self.samples),
            "tokens_per_s_mean": self.mean, "tokens_per_s_sd": self.sd, "tokens_per_s_samples": self.samples,
            "preemptions": self.preemptions,
            **self._speculation_dict(),
        }

    def _speculation_dict(self) -> dict:
        measured = acceptance(self.speculation) if self.speculation else None
        if measured is None:
            return {}
        return {"spec_acceptance_rate": measured[0], "spec_mean_accepted_length": measured[1]}


def plan(prompt_sizes: list[int], gen_sizes: list[int], concurrency: list[int], threads: list[int]) -> list[TestSpec]:
    """Every test in run order; a size of 0 skips that kind, as in llama-bench."""
    specs = []
    for t in threads:
        for c in concurrency:
            specs += [TestSpec("pp", p, c, t) for p in prompt_sizes if p > 0]
            specs += [TestSpec("tg", n, c, t) for n in gen_sizes if n > 0]
    return specs


def _timed_run(engine: LLMEngine, spec: TestSpec, generator: torch.Generator) -> float:
    """Seconds for one repetition of `spec`, from the first add_request until every sequence finishes."""
    vocab = engine.vocab_size
    low = min(FIRST_ORDINARY_ID, vocab - 1)
    prompt_len, max_tokens = (spec.tokens, 1) if spec.kind == "pp" else (1, spec.tokens)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [torch.randint(low, vocab, (prompt_len,), generator=generator).tolist()
               for _ in range(spec.concurrency)]
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{spec.name}-{i}", prompt, params)
    while engine.has_work():
        engine.step()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return time.perf_counter() - start


def run_test(engine: LLMEngine, spec: TestSpec, repetitions: int, warmup: bool, seed: int = 0) -> TestResult:
    torch.set_num_threads(spec.threads)
    generator = torch.Generator().manual_seed(seed)
    if warmup:
        _timed_run(engine, spec, generator)
    before = engine.stats()
    result = TestResult(spec)
    tokens = spec.tokens * spec.concurrency
    for _ in range(repetitions):
        result.samples.append(tokens / _timed_run(engine, spec, generator))
    after = engine.stats()
    result.preemptions = after["preemptions"] - before["preemptions"]
    if "spec_verifications" in after:
        result.speculation = {key: after[key] - before[key] for key in after if key.startswith("spec_")}
    return result


def run_tests(engine: LLMEngine, specs: list[TestSpec], repetitions: int, warmup: bool = True,
              on_result: Callable[[TestResult], None] | None = None) -> list[TestResult]:
    threads = torch.get_num_threads()
    results = []
    try:
        for i, spec in enumerate(specs):
            results.append(run_test(engine, spec, repetitions, warmup, seed=i))
            if on_result:
                on_result(results[-1])
    finally:
        torch.set_num_threads(threads)  # the thread count is process-wide: leave it as found
    return results


def _files_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def describe_model(loaded: LoadedModel) -> dict:
    """What a benchmark figure depends on besides the hardware."""
    from ember.bench.estimates import DTYPE_NAMES, gguf_quant
    from ember.bench.shapes import parameter_count

    if loaded.format == "gguf":
        quant = gguf_quant(loaded.path)
    else:
        dtype = loaded.config.torch_dtype or str(loaded.dtype).removeprefix("torch.")
        quant = DTYPE_NAMES.get(dtype, dtype.upper())
    return {
        "name": loaded.name, "path": str(loaded.path), "format": loaded.format, "quant": quant,
        "params": parameter_count(loaded.config), "size_bytes": _files_size(Path(loaded.path)),
        "dtype": str(loaded.dtype).removeprefix("torch."), "device": str(loaded.device),
    }
