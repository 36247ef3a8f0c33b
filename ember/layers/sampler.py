"""Turns a batch of next-token logits into tokens, each row under its own SamplingParams.

Order, as in transformers and vLLM: logit bias -> repetition penalty -> presence/frequency penalties ->
min_tokens -> grammar mask (constrained decoding, ember.layers.grammar_mask) -> greedy argmax, or temperature ->
top-k -> top-p -> min-p -> draw. Every filter runs on the
whole batch at once with per-row parameter columns (neutral values for rows that do not use it); only
the draw loops over rows, so that a seeded request draws from its own generator and gets the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ember.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ember.layers.grammar_mask import Constraint, GrammarMasks


@dataclass
class TokenLogprob:
    """Log-probability of one generated token under the model, with the `top` best alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SamplingState:
    """One sequence's sampling inputs, kept by the engine for the life of the request."""

    params: SamplingParams
    generator: torch.Generator | None  # seeded from params.seed; None draws from torch's global RNG
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: frozenset[int] = frozenset()  # banned until min_tokens; empty when ignore_eos
    grammar: Constraint | None = None  # the request's constraint (ember.engine.structured), when it has one
    # The prompt as a tensor, built on first use: the repetition penalty needs it every step and
    # converting a long prompt from a list each time would dominate the step.
    _prompt_tensor: torch.Tensor | None = field(default=None, init=False, repr=False)

    def seen_token_ids(self, device: torch.device) -> torch.Tensor:
        """The token ids the repetition penalty applies to: prompt and output, or only the last
        params.repetition_window of them (Ollama's repeat_last_n)."""
        window = self.params.repetition_window
        if window is not None:
            recent = self.output_token_ids[-window:]
            if len(recent) < window:
                recent = self.prompt_token_ids[len(recent) - window:] + recent
            return torch.tensor(recent, dtype=torch.long, device=device)
        if self._prompt_tensor is None or self._prompt_tensor.device != device:
            self._prompt_tensor = torch.tensor(self.prompt_token_ids, dtype=torch.long, device=device)
        output = torch.tensor(self.output_token_ids, dtype=torch.long, device=device)
        return torch.cat([self._prompt_tensor, output])

    def min_tokens_banned(self) -> frozenset[int]:
        """Token ids that would end the sequence before params.min_tokens; empty once it is reached."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return frozenset()
        return self.eos_token_ids | frozenset(self.params.stop_token_ids)


def changes_logits(state: SamplingState) -> bool:
    params = state.params
    return bool(
        params.logit_bias
        or params.repetition_penalty != 1.0
        or params.presence_penalty
        or params.frequency_penalty
        or state.min_tokens_banned()
    )


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def _rows_and_ids(per_row: list[torch.Tensor], rows: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten per-row token id tensors into (row index, token id) pairs for index_put_."""
    lengths = torch.tensor([ids.numel() for ids in per_row], device=device)
    row_index = torch.repeat_interleave(torch.tensor(rows, device=device), lengths)
    return row_index, torch.cat(per_row)


def _apply_logit_bias(logits: torch.Tensor, states: list[SamplingState]) -> None:
    rows, ids, amounts = [], [], []
    for row, state in enumerate(states):
        bias = state.params.logit_bias
        rows += [row] * len(bias)
        ids += bias.keys()
        amounts += bias.values()
    if rows:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
        logits.index_put_(index, torch.tensor(amounts, dtype=logits.dtype, device=logits.device), accumulate=True)


def _apply_repetition_penalty(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """transformers' semantics: a seen token's positive logit is divided by the penalty, a negative one multiplied."""
    rows = [row for row, state in enumerate(states) if state.params.repetition_penalty != 1.0]
    if not rows:
        return logits
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen.index_put_(_rows_and_ids([states[r].seen_token_ids(logits.device) for r in rows], rows, logits.device),
                    torch.tensor(True, device=logits.device))
    penalty = _column([state.params.repetition_penalty for state in states], logits)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def _apply_presence_frequency(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """OpenAI's semantics over the generated tokens: minus frequency * count, minus presence if count > 0."""
    rows = [
        row for row, state in enumerate(states)
        if (state.params.presence_penalty or state.params.frequency_penalty) and state.output_token_ids
    ]
    if not rows:
        return logits
    device = logits.device
    counts = torch.zeros_like(logits)
    outputs = [torch.tensor(states[r].output_token_ids, dtype=torch.long, device=device) for r in rows]
    counts.index_put_(_rows_and_ids(outputs, rows, device), torch.tensor(1.0, device=device), accumulate=True)
    frequency = _column([state.params.frequency_penalty for state in states], logits)
    presence = _column([state.params.presence_penalty for state in states], logits)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def _apply_min_tokens(logits: torch.Tensor, states: list[SamplingState]) -> None:
    vocab = logits.shape[-1]
    rows, ids = [], []
    for row, state in enumerate(states):
        # EOS ids come from model files, not from the request, so one past the logits is skipped, not fatal.
        banned = [token for token in state.min_tokens_banned() if token < vocab]
        rows += [row] * len(banned)
        ids += banned
    if rows:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
        logits.index_put_(index, torch.tensor(float("-inf"), device=logits.device))


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    vocab = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    uses_top_p = any(p.top_p < 1.0 for p in params)
    if not uses_top_p:
        if min(top_k) == vocab:
            return logits
        # No top-p: a partial top-k is far cheaper than sorting the whole vocabulary.
        best = logits.topk(max(k for k in top_k if k < vocab), dim=-1).values
        kth = best.gather(1, (torch.tensor(top_k, device=logits.device).clamp(max=best.shape[-1]) - 1)[:, None])
        keep_all = torch.tensor([k == vocab for k in top_k], device=logits.device)[:, None]
        return logits.masked_fill(~keep_all & (logits < kth), float("-inf"))
    nucleus = [row for row, p in enumerate(params) if p.top_p < 1.0]
    if len(nucleus) < len(params):
        # Sort only the rows that use top-p; the others take the top-k path (each row is filtered on its own).
        others = [row for row, p in enumerate(params) if p.top_p >= 1.0]
        out = torch.empty_like(logits)
        out[others] = _top_k_top_p(logits[others], [params[row] for row in others])
        out[nucleus] = _top_k_top_p(logits[nucleus], [params[row] for row in nucleus])
        return out
    ranked, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    ranked = ranked.masked_fill(rank >= torch.tensor(top_k, device=logits.device)[:, None], float("-inf"))
    probs = ranked.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better-ranked tokens; the best one is always kept
    # top_p = 1 must keep everything, even where rounding pushes the cumulative sum to 1 before the tail.
    top_p = _column([p.top_p if p.top_p < 1.0 else math.inf for p in params], logits)
    ranked = ranked.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ranked)


def _min_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Drop tokens less likely than min_p times the best one: p_i < min_p * p_max <=> l_i < l_max + log(min_p)."""
    if not any(p.min_p > 0 for p in params):
        return logits
    floor = logits.max(dim=-1, keepdim=True).values + torch.log(_column([p.min_p for p in params], logits))
    return logits.masked_fill(logits < floor, float("-inf"))


def _draw(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) picks token i with probability p_i."""
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs)
    unseeded = [row for row, state in enumerate(states) if state.generator is None]
    if unseeded:
        noise[unseeded] = torch.empty_like(probs[unseeded]).exponential_()
    for row, state in enumerate(states):
        if state.generator is not None:
            noise[row].exponential_(generator=state.generator)
    # A draw of exactly 0 would make 0/0 = NaN for a banned token, and argmax would pick the NaN.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def filtered_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p over adjusted logits: the softmax of the result is the
    distribution a sampling row draws from (speculative decoding verifies against it)."""
    if any(p.temperature != 1.0 for p in params):  # dividing by 1 changes nothing: skip a vocabulary-wide pass
        logits = logits / _column([p.temperature for p in params], logits)
    logits = _top_k_top_p(logits, params)
    return _min_p(logits, params)


def _sample(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    return _draw(filtered_logits(logits, [state.params for state in states]), states)


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each row's log-probability of its token under the model's distribution, with the `top` most likely."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    best: list[list[tuple[int, float]]] = [[] for _ in tokens]
    if top:
        values, ids = logprobs.topk(top, dim=-1)
        best = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return [TokenLogprob(t, c, b) for t, c, b in zip(tokens, chosen, best, strict=True)]


def _logprobs(raw: torch.Tensor, states: list[SamplingState], tokens: list[int],
              masks: GrammarMasks | None = None) -> list[TokenLogprob | None]:
    """Log-probabilities under the model's own distribution (before any penalty or filter), as OpenAI reports;
    on a constrained row, under that distribution restricted to what the grammar allows (the tokens the
    sampler chose among), so that no alternative the output could not contain is reported."""
    result: list[TokenLogprob | None] = [None] * len(states)
    wanted = [row for row, state in enumerate(states) if state.params.logprobs is not None]
    if not wanted:
        return result
    scores = raw[wanted]
    if masks is not None:
        scores = scores.float()  # raw[wanted] is already a copy: the raw logits stay as they are
        masks.select(wanted).apply(scores)
    most = max(states[r].params.logprobs for r in wanted)
    scored = token_logprobs(scores, [tokens[r] for r in wanted], most)
    for row, entry in zip(wanted, scored, strict=True):
        entry.top = [(t, v) for t, v in entry.top[: states[row].params.logprobs] if v != -math.inf]
        result[row] = entry
    return result


def grammar_masks(states: list[SamplingState], vocab_size: int) -> GrammarMasks | None:
    """The grammar masks of the batch's constrained rows, or None when no row is constrained."""
    constraints = [state.grammar for state in states]
    if all(constraint is None for constraint in constraints):
        return None
    from ember.layers.grammar_mask import fill_masks  # xgrammar is loaded only once a request needs it

    return fill_masks(constraints, vocab_size)


def _apply_grammar(logits: torch.Tensor, states: list[SamplingState], masks: GrammarMasks) -> None:
    masks.apply(logits)
    banning = [row for row in masks.rows if states[row].min_tokens_banned()]
    if not banning:
        return
    # Where min_tokens banned the only tokens the grammar allows (its stop tokens: the text is complete),
    # the grammar wins: such a row chooses uniformly among its allowed tokens, as if min_tokens were met.
    dead = ~torch.isfinite(logits[banning]).any(dim=-1)
    if bool(dead.any()):
        rows = [row for row, is_dead in zip(banning, dead.tolist(), strict=True) if is_dead]
        allowed = torch.zeros((len(rows), logits.shape[-1]), dtype=logits.dtype, device=logits.device)
        masks.select(rows).apply(allowed)
        logits[rows] = allowed


class Sampler:
    def __call__(
        self, logits: torch.Tensor, states: list[SamplingState]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Pick one token per row of `logits` [B, V]; also return each row's logprobs if it asked for them."""
        if logits.shape[0] != len(states):
            raise ValueError(f"{logits.shape[0]} rows of logits for {len(states)} sampling states")
        masks = grammar_masks(states, logits.shape[-1])
        if masks is None and all(state.params.is_greedy and not changes_logits(state) for state in states):
            tokens = logits.argmax(dim=-1).tolist()
            return tokens, _logprobs(logits, states, tokens, None)
        processed = self.adjust_logits(logits, states, masks)
        chosen = processed.argmax(dim=-1)
        random_rows = [row for row, state in enumerate(states) if not state.params.is_greedy]
        if random_rows:
            chosen[random_rows] = _sample(processed[random_rows], [states[r] for r in random_rows])
        tokens = chosen.tolist()
        return tokens, _logprobs(logits, states, tokens, masks)

    @staticmethod
    def adjust_logits(logits: torch.Tensor, states: list[SamplingState],
                      masks: GrammarMasks | None = None) -> torch.Tensor:
        """A copy of `logits` after logit bias, repetition/presence/frequency penalties, min_tokens bans and the
        grammar masks: the scores greedy rows take the argmax of and the others sample from after temperature."""
        adjusted = logits.clone()
        _apply_logit_bias(adjusted, states)
        adjusted = _apply_repetition_penalty(adjusted, states)
        adjusted = _apply_presence_frequency(adjusted, states)
        _apply_min_tokens(adjusted, states)
        if masks is not None:
            _apply_grammar(adjusted, states, masks)
        return adjusted
