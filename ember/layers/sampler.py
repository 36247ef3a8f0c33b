"""Turns a batch of next-token logits into tokens, each row with its own sampling parameters.

Order as in transformers/vLLM: logit bias -> repetition penalty -> presence/frequency penalties ->
min_tokens -> (greedy argmax) or temperature -> top-k -> top-p -> min-p -> draw with the row's generator.
Filters run vectorised over the batch on one descending sort; only the draw is per row, so a seeded
request gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ember.engine.outputs import TokenLogprob
from ember.sampling_params import SamplingParams


@dataclass
class SamplingState:
    """One sequence's sampling inputs, kept by the engine for the life of the request."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)


def _penalize(logits: torch.Tensor, state: SamplingState) -> None:
    params, row = state.params, logits
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=row.device)
        row[ids] += torch.tensor(list(params.logit_bias.values()), device=row.device, dtype=row.dtype)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(state.prompt_token_ids) | set(state.output_token_ids)), device=row.device)
        if seen.numel():
            scores = row[seen]
            row[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and state.output_token_ids:
        ids, counts = torch.tensor(state.output_token_ids, device=row.device).unique(return_counts=True)
        row[ids] -= params.frequency_penalty * counts.to(row.dtype) + params.presence_penalty
    if len(state.output_token_ids) < params.min_tokens:
        banned = torch.tensor(sorted(state.eos_token_ids | set(params.stop_token_ids)), device=row.device)
        if banned.numel():
            row[banned] = float("-inf")


def _needs_processing(params: SamplingParams) -> bool:
    return bool(params.logit_bias or params.repetition_penalty != 1.0 or params.presence_penalty
                or params.frequency_penalty or params.min_tokens)


def _filtered_probs(logits: torch.Tensor, states: list[SamplingState]) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top-k, top-p and min-p, in descending order, with their token ids."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([s.params.temperature for s in states], device=device)[:, None]
    top_k = torch.tensor([s.params.top_k if s.params.top_k > 0 else vocab for s in states], device=device)[:, None]
    top_p = torch.tensor([s.params.top_p for s in states], device=device)[:, None]
    min_p = torch.tensor([s.params.min_p for s in states], device=device)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device)[None, :]
    sorted_probs = sorted_probs.masked_fill(rank >= top_k, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of better tokens; the best is always kept
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    sorted_probs = sorted_probs.masked_fill(sorted_probs < min_p * sorted_probs[:, :1], 0.0)
    return sorted_probs, order


class Sampler:
    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> tuple[list[int], list[TokenLogprob | None]]:
        raw = logits
        if any(_needs_processing(s.params) for s in states):
            logits = logits.clone()
            for row, state in zip(logits, states, strict=True):
                _penalize(row, state)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(states) if not s.params.is_greedy]
        if random_rows:
            picked = [states[i] for i in random_rows]
            sorted_probs, order = _filtered_probs(logits[random_rows], picked)
            for j, (row, state) in enumerate(zip(random_rows, picked, strict=True)):
                choice = torch.multinomial(sorted_probs[j], 1, generator=state.generator)
                tokens[row] = order[j, choice[0]]
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw, states, token_list)

    @staticmethod
    def _logprobs(raw: torch.Tensor, states: list[SamplingState], tokens: list[int]) -> list[TokenLogprob | None]:
        wanted = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        result: list[TokenLogprob | None] = [None] * len(states)
        if not wanted:
            return result
        logprobs = torch.log_softmax(raw[wanted].float(), dim=-1)
        most = max(states[i].params.logprobs for i in wanted)
        top_values, top_ids = logprobs.topk(max(most, 1), dim=-1)
        for j, i in enumerate(wanted):
            k = states[i].params.logprobs
            top = list(zip(top_ids[j, :k].tolist(), top_values[j, :k].tolist(), strict=True))
            result[i] = TokenLogprob(tokens[i], logprobs[j, tokens[i]].item(), top)
        return result
