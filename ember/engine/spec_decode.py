"""Speculative verification: which drafted tokens the target model keeps, without changing its output.

A sequence with k drafted tokens is computed as one chunk of k + 1 query tokens, giving the target's logits
after its last token and after each draft. Each position's distribution is what the sampler would use there:
the same logit bias, penalties and min_tokens bans, computed as if the drafts before it had been accepted
(penalties depend on the tokens generated so far), then temperature, top-k, top-p and min-p.

Greedy rows keep drafts while they equal the argmax, then take the argmax: exactly the tokens of decoding
one at a time. Sampling rows use speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023):
draft d drawn from q is accepted with probability min(1, p(d) / q(d)); on the first rejection the token is
drawn from norm(max(0, p - q)); when every draft is accepted one more is drawn from the last position's p.
The output then follows p exactly. An n-gram proposal is a point mass (q(d) = 1). Draws use the request's
seeded generator, so a seeded request repeats itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ember.layers.sampler import Sampler, SamplingState, TokenLogprob, _logprobs, filtered_logits


@dataclass
class Proposal:
    tokens: list[int]
    # [len(tokens), vocab]: the distribution each token was drawn from; None for point masses (an n-gram
    # match, or a draft model's argmax for a greedy request).
    probs: torch.Tensor | None = None


def state_after(state: SamplingState, drafted: list[int]) -> SamplingState:
    """The request's sampling state as it would be once `drafted` were generated (shares the generator)."""
    view = copy.copy(state)  # keeps the cached prompt tensor
    view.output_token_ids = state.output_token_ids + drafted
    return view


def distributions(logits: torch.Tensor, states: list[SamplingState]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row: the sampler's adjusted logits (greedy rows take their argmax) and, for sampling rows, the
    probabilities it draws from (other rows' are left zero; None when no row samples)."""
    adjusted = Sampler.adjust_logits(logits, states)
    random_rows = [row for row, state in enumerate(states) if not state.params.is_greedy]
    if not random_rows:
        return adjusted, None
    probs = torch.zeros_like(adjusted)
    probs[random_rows] = filtered_logits(adjusted[random_rows], [states[r].params for r in random_rows]).softmax(-1)
    return adjusted, probs


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from unnormalised probabilities `probs` [vocab]."""
    return int(torch.multinomial(probs, 1, generator=generator))


def _accept(adjusted: torch.Tensor, probs: torch.Tensor | None, state: SamplingState, proposal: Proposal) -> list[int]:
    """The tokens one verified chunk yields: the accepted drafts, then the target's own token."""
    drafts = proposal.tokens
    if state.params.is_greedy:
        best = adjusted.argmax(dim=-1).tolist()
        kept = 0
        while kept < len(drafts) and drafts[kept] == best[kept]:
            kept += 1
        return drafts[:kept] + [best[kept]]
    generator = state.generator
    for index, token in enumerate(drafts):
        p = probs[index]
        q = proposal.probs[index] if proposal.probs is not None else None
        q_token = 1.0 if q is None else float(q[token])
        uniform = float(torch.rand((), generator=generator, device=p.device))
        if uniform * q_token < float(p[token]):
            continue
        residual = p.clone() if q is None else (p - q).clamp_min_(0)
        residual[token] = 0  # p(d) < q(d) here, so max(0, p - q) is already 0 at d; exact for point masses
        return drafts[:index] + [draw(residual if float(residual.sum()) > 0 else p, generator)]
    return drafts + [draw(probs[len(drafts)], generator)]


def verify(items: list[tuple[torch.Tensor, SamplingState, Proposal]]
           ) -> list[tuple[list[int], list[TokenLogprob] | None]]:
    """For each (logits [k + 1, vocab] of a verified chunk, the request's state, its k-token proposal):
    the tokens to emit (1 to k + 1) and their logprobs when the request asked for them."""
    states: list[SamplingState] = []
    for _, state, proposal in items:
        states += [state_after(state, proposal.tokens[:i]) for i in range(len(proposal.tokens) + 1)]
    logits = torch.cat([rows for rows, _, _ in items])
    adjusted, probs = distributions(logits, states)
    results = []
    start = 0
    for rows, state, proposal in items:
        span = slice(start, start + rows.shape[0])
        tokens = _accept(adjusted[span], None if probs is None else probs[span], state, proposal)
        logprobs = None
        if state.params.logprobs is not None:
            logprobs = _logprobs(rows[: len(tokens)], states[span][: len(tokens)], tokens)
        results.append((tokens, logprobs))
        start = span.stop
    return results
