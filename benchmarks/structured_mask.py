"""What constrained decoding costs per decode step: grammar mask fill + apply against the decode step itself.

    python benchmarks/structured_mask.py /work/bench/b1-Q4_K_M.gguf --batch 1,16 --steps 8

For each batch size B:
- decode step: B free sequences decoding, `LLMEngine.step()` timed over --steps steps (median);
- mask: B grammar matchers (a JSON schema with nested objects, arrays, enums, numbers and strings) walked
  along the tokens of a valid instance; at every position the bitmask is filled for all B rows and applied to
  [B, vocab] logits, exactly as the sampler does (median over the positions);
- constrained step: the same B sequences with that schema as their constraint, `LLMEngine.step()` timed
  (median), to see the cost inside the real step (sampler path included);
- mixed step: half of the B sequences (at least one) constrained, the others free: the free ones share its step, so
  mixed / free step - 1 is how much a constrained neighbour slows a free request (the goal: at most 10 %).
Prints the ratio mask / decode step (median mask; the slowest position too); the goal is at most 10 %.
"""

# ruff: noqa: I001  (ember before torch: it sets OMP_WAIT_POLICY for its kernels' thread pool)
from __future__ import annotations

import ember  # noqa: F401
import argparse
import json
import statistics
import time

import torch

from ember.engine.engine import EngineArgs, LLMEngine
from ember.layers.grammar_mask import fill_masks
from ember.sampling_params import SamplingParams, StructuredOutput

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 64},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                     "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 8},
    "score": {"type": "number"}, "note": {"type": "string", "maxLength": 2000}},
    "required": ["name", "age", "address", "tags", "score", "note"]}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "address": {"city": "London", "zip": "12345"},
            "tags": ["red", "blue"], "score": 9.75, "note": "first programmer, wrote notes on the engine"}


def _decode_steps(engine: LLMEngine, batch: int, steps: int, structured: StructuredOutput | None,
                  tag: str, constrained: int | None = None) -> float:
    """Median step time of `batch` sequences decoding, the first `constrained` (default: all) under
    `structured`, the others free."""
    constrained = batch if constrained is None else constrained
    generator = torch.Generator().manual_seed(batch)
    for i in range(batch):
        params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True,
                                structured=structured if i < constrained else None)
        prompt = torch.randint(3, engine.vocab_size, (32,), generator=generator).tolist()
        engine.add_request(f"{tag}-{i}", prompt, params)
    while any(r.seq.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    for request_id in list(engine.requests):
        engine.abort(request_id)
    return statistics.median(times)


def _mask_cost(engine: LLMEngine, batch: int, structured: StructuredOutput) -> tuple[float, float, int]:
    """Median fill + apply time along a valid instance, tokenized greedily (longest allowed token each step:
    an SPM tokenizer's own encoding starts with a space the grammar does not allow)."""
    vocab_bytes = engine.grammars.token_bytes
    by_bytes = {piece: token for token, piece in enumerate(vocab_bytes) if piece}
    longest = max(len(piece) for piece in by_bytes)
    remaining = json.dumps(INSTANCE).encode()
    states = [engine.grammars.state(structured) for _ in range(batch)]
    times = []
    while remaining:
        logits = torch.randn(batch, engine.vocab_size)
        start = time.perf_counter()
        fill_masks(states, engine.vocab_size).apply(logits)
        times.append(time.perf_counter() - start)
        allowed = torch.isfinite(logits[0])
        token = next(t for size in range(min(longest, len(remaining)), 0, -1)
                     if (t := by_bytes.get(remaining[:size])) is not None and allowed[t])
        remaining = remaining[len(vocab_bytes[token]):]
        for state in states:
            state.accept(token)
    return statistics.median(times), max(times), len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="free/constrained/mixed measurements interleaved")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    engine = LLMEngine(args.model, EngineArgs(max_num_seqs=max(batches), max_model_len=512, threads=args.threads))
    structured = StructuredOutput("json_schema", json.dumps(SCHEMA))
    start = time.perf_counter()
    engine.grammars.compile(structured)
    print(f"model {engine.model_name}, vocab {engine.vocab_size}, torch threads {torch.get_num_threads()}; "
          f"schema compiled in {1e3 * (time.perf_counter() - start):.1f} ms (first compile includes the vocabulary)")
    print(f"{'batch':>5} {'decode step ms':>15} {'mask ms':>8} {'mask/step':>10} {'constrained step ms':>20} "
          f"{'mixed step ms':>14} {'free slowed':>12}")
    for batch in batches:
        # Free, all-constrained and mixed batches interleaved, --rounds times: a step of 30-300 ms on a shared
        # machine moves by ±10 % between runs, more than the differences measured here.
        free, full, half = [], [], []
        for r in range(args.rounds):
            free.append(_decode_steps(engine, batch, args.steps, None, f"free{batch}-{r}"))
            full.append(_decode_steps(engine, batch, args.steps, structured, f"json{batch}-{r}"))
            half.append(_decode_steps(engine, batch, args.steps, structured, f"mixed{batch}-{r}",
                                      constrained=max(batch // 2, 1)))
        step, constrained, mixed = (statistics.median(times) for times in (free, full, half))
        mask, worst, positions = _mask_cost(engine, batch, structured)
        print(f"{batch:>5} {1e3 * step:>15.2f} {1e3 * mask:>8.3f} {100 * mask / step:>9.2f}% "
              f"{1e3 * constrained:>20.2f} {1e3 * mixed:>14.2f} {100 * (mixed / step - 1):>+11.1f}%   "
              f"(mask: median over {positions} positions, max {1e3 * worst:.3f} ms)")


if __name__ == "__main__":
    main()
