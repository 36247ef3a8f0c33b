"""Drive a loaded model through ember's paged runner without the sampler: the reference path for tests."""

from __future__ import annotations

import torch

from ember.engine.block_manager import BlockManager
from ember.engine.model_runner import ModelRunner
from ember.engine.scheduler import ScheduledChunk
from ember.engine.sequence import Sequence


def _runner(model, config, block_size=4, num_blocks=128, lora=None):
    runner = ModelRunner(model, config, torch.device("cpu"), next(model.parameters()).dtype, block_size, num_blocks)
    runner.lora = lora
    return BlockManager(num_blocks, block_size), runner


def prefill_logits(model, config, prompt: list[int], chunk: int = 7, lora=None, lora_slot: int = 0) -> torch.Tensor:
    """Logits at every prompt position, prefilled in chunks so later chunks read earlier ones from the cache;
    with `lora` (ember.layers.lora.LoraLayers), through the adapter in `lora_slot`."""
    blocks, runner = _runner(model, config, num_blocks=max(128, -(-len(prompt) // 4)), lora=lora)
    seq = Sequence("ref", prompt, None)
    seq.lora_slot = lora_slot
    blocks.allocate(seq)
    hidden = []
    while seq.num_computed_tokens < len(seq):
        count = min(chunk, len(seq) - seq.num_computed_tokens)
        hidden.append(runner.hidden_states(ScheduledChunk(seq, count)))
        seq.num_computed_tokens += count
    with torch.inference_mode():
        return model.compute_logits(torch.cat(hidden))


def greedy_tokens(model, config, prompt: list[int], steps: int) -> list[int]:
    blocks, runner = _runner(model, config)
    seq = Sequence("ref", prompt, None)
    blocks.allocate(seq)
    out = []
    chunk = 5
    while seq.num_computed_tokens < len(seq):
        count = min(chunk, len(seq) - seq.num_computed_tokens)
        _, logits, _ = runner.run([ScheduledChunk(seq, count)])
        seq.num_computed_tokens += count
    for _ in range(steps):
        token = int(logits[0].argmax())
        out.append(token)
        seq.token_ids.append(token)
        blocks.grow(seq, len(seq))
        _, logits, _ = runner.run([ScheduledChunk(seq, 1)])
        seq.num_computed_tokens += 1
    return out


def teacher_forced_agreement(model, config, cases: list[dict], **lora) -> tuple[int, int, list[float]]:
    """Ember fed llama.cpp's outputs (`cases` as in shared/testdata/gguf/tiny-llama-refs.json): (top-1 hits,
    steps where llama.cpp's top-2 margin exceeds 0.2, |log-probability differences| of llama.cpp's top tokens).
    `lora`: prefill_logits' lora and lora_slot."""
    hits = total = 0
    deltas = []
    for case in cases:
        ids = case["prompt_ids"] + case["output_ids"]
        logprobs = torch.log_softmax(prefill_logits(model, config, ids, **lora), dim=-1)
        first = len(case["prompt_ids"]) - 1
        for step, top in enumerate(case["top_logprobs"]):
            ours = logprobs[first + step]
            if top[0][1] - top[1][1] > 0.2:
                total += 1
                hits += int(ours.argmax()) == top[0][0]
            deltas += [abs(ours[token].item() - logprob) for token, logprob in top]
    return hits, total, sorted(deltas)
