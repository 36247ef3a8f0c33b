"""Decode throughput with LoRA adapters mixed in one batch vs the base model alone (docs/lora.md).

    python benchmarks/lora.py /work/bench/b1-Q4_K_M.gguf --seqs 16 --adapters 4 --rank 16 --steps 16 --rounds 2

Writes `--adapters` random PEFT adapters (every projection of every layer, rank `--rank`) for the model's shapes,
loads them into one engine, and times `--steps` decode steps of `--seqs` sequences: all on the base model, then
spread over the adapters (seqs / adapters each), interleaved `--rounds` times (the machine is shared: the ratio
of each round's adjacent runs is reported, and their median). Also times three ways of batching the low-rank
matmuls for one projection (the first line it prints).
"""

# ruff: noqa: I001  (ember before torch: it sets OMP_WAIT_POLICY for its kernels' thread pool)
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ember  # noqa: F401
import torch
from safetensors.torch import save_file

from ember.engine.engine import EngineArgs, LLMEngine
from ember.engine.lora_spec import LoraSpec
from ember.sampling_params import SamplingParams

TARGETS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def write_adapter(folder: Path, model, rank: int, seed: int) -> None:
    """A random PEFT adapter (the files PEFT's save_pretrained writes) for every projection of `model`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for index, layer in enumerate(model.model.layers):
        for block, parts in TARGETS.items():
            for part in parts:
                module = getattr(getattr(layer, block), part)
                prefix = f"base_model.model.model.layers.{index}.{block}.{part}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(
        p for parts in TARGETS.values() for p in parts)}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def decode_steps(engine: LLMEngine, loras: list[str | None], steps: int, prompt_len: int) -> list[float]:
    """The seconds of each of `steps` decode steps of len(loras) sequences (prefill not timed)."""
    generator = torch.Generator().manual_seed(0)
    vocab = engine.vocab_size
    for index, lora in enumerate(loras):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=generator).tolist()
        engine.add_request(f"r{index}", prompt, SamplingParams(max_tokens=steps + 2, temperature=0.0,
                                                               ignore_eos=True, lora=lora, use_prefix_cache=False))
    while any(engine.requests[f"r{i}"].seq.num_output_tokens == 0 for i in range(len(loras))):
        engine.step()
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        seconds.append(time.perf_counter() - started)
    while engine.has_work():
        engine.step()
    return seconds


def micro(tokens: int, features: int, rank: int, adapters: int, repeats: int = 50) -> dict[str, float]:
    """Milliseconds of one projection's low-rank path for `tokens` rows spread over `adapters`: the stacked form
    ember.layers.lora uses (all A/B side by side, each row's own columns kept by a mask), a loop over the adapters
    present (index_select, two matmuls, index_add) and a gathered bmm (each row's A/B gathered from stacks)."""
    x = torch.randn(tokens, features)
    a = torch.randn(adapters, rank, features)
    b = torch.randn(adapters, features, rank)
    slots = torch.arange(tokens) % adapters
    groups = [(s, (slots == s).nonzero().flatten()) for s in range(adapters)]

    def loop():
        y = torch.zeros(tokens, features)
        for s, rows in groups:
            y.index_add_(0, rows, x.index_select(0, rows) @ a[s].T @ b[s].T)
        return y

    def gathered():
        h = torch.bmm(a[slots], x.unsqueeze(-1))  # [T, r, 1]
        return torch.bmm(b[slots], h).squeeze(-1)

    a_all, b_all = a.reshape(-1, features), b.permute(1, 0, 2).reshape(features, -1)
    cols = torch.arange(adapters).repeat_interleave(rank)

    def stacked():
        mask = (slots[:, None] == cols[None, :]).float()
        return (x @ a_all.T).mul_(mask) @ b_all.T

    assert torch.allclose(loop(), gathered(), rtol=1e-3, atol=1e-3)
    assert torch.allclose(loop(), stacked(), rtol=1e-3, atol=1e-3)
    result = {}
    for name, fn in (("stacked", stacked), ("loop", loop), ("gathered_bmm", gathered)):
        fn()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        result[name] = (time.perf_counter() - started) / repeats * 1000
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print("low-rank path of one 2048x2048 projection, 16 rows over 4 adapters, rank 16 (ms):",
          {k: round(v, 3) for k, v in micro(16, 2048, 16, 4).items()}, flush=True)
    engine = LLMEngine(args.model, EngineArgs(max_num_seqs=args.seqs, max_model_len=args.prompt_len + args.steps + 8,
                                              threads=args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        names = []
        for index in range(args.adapters):
            write_adapter(Path(tmp) / f"a{index}", engine.loaded.model, args.rank, seed=index)
            names.append(f"a{index}")
            engine.load_lora(LoraSpec(names[-1], str(Path(tmp) / names[-1])))
    print(f"{args.adapters} adapters of rank {args.rank}: {engine.lora.nbytes / 2**20:.1f} MiB", flush=True)
    plans = {"base": [None] * args.seqs, "mixed": [names[i % len(names)] for i in range(args.seqs)]}
    rates: dict[str, list[float]] = {name: [] for name in plans}
    steps: dict[str, list[float]] = {name: [] for name in plans}
    for _ in range(args.rounds):
        for name, loras in plans.items():  # interleaved: a slow moment of the machine hits both alike
            seconds = decode_steps(engine, loras, args.steps, args.prompt_len)
            steps[name] += seconds
            rates[name].append(args.seqs * len(seconds) / sum(seconds))
            print(f"{name}: {rates[name][-1]:.1f} tok/s", flush=True)
    base, mixed = max(rates["base"]), max(rates["mixed"])
    # Each round's two runs are adjacent in time: their ratio is the least disturbed by others' load.
    ratios = sorted(m / b for m, b in zip(rates["mixed"], rates["base"], strict=True))
    print(f"decode, {args.seqs} sequences: base {base:.1f} tok/s, {args.adapters} adapters mixed {mixed:.1f} tok/s "
          f"(best rounds); mixed/base per round {[round(r, 2) for r in ratios]}, median "
          f"{statistics.median(ratios):.2f}")
    # Single steps: their median and fastest are the least touched by other jobs' bursts.
    print("mixed/base throughput from step times: median step "
          f"{statistics.median(steps['base']) / statistics.median(steps['mixed']):.2f}, fastest step "
          f"{min(steps['base']) / min(steps['mixed']):.2f} ({len(steps['base'])} steps each; base median "
          f"{statistics.median(steps['base']) * 1000:.0f} ms, mixed {statistics.median(steps['mixed']) * 1000:.0f} ms)")

if __name__ == "__main__":
    main()
