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

from ember.layers.sampler import (
    Sampler,
    SamplingState,
    TokenLogprob,
    _logprobs,
    changes_logits,
    filtered_logits,
)


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
    """The sampler's adjusted logits of every row (greedy rows take their argmax; `logits` itself when no
    state changes them) and the probabilities the sampling rows draw from, one row each in their order
    (None when no row samples)."""
    adjusted = Sampler.adjust_logits(logits, states) if any(map(changes_logits, states)) else logits
    random_rows = [row for row, state in enumerate(states) if not state.params.is_greedy]
    if not random_rows:
        return adjusted, None
    rows = adjusted if len(random_rows) == len(states) else adjusted[random_rows]
    return adjusted, filtered_logits(rows, [states[r].params for r in random_rows]).softmax(-1)


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of unnormalised probabilities `probs` [n, vocab], each from one uniform of its
    row's generator (None: torch's global one) by inverse transform: the first token whose cumulative
    probability exceeds it. One cumulative sum for all rows costs a tenth of torch.multinomial per row on a
    32k vocabulary. A token of probability 0 is never drawn: its cumulative sum equals its predecessor's."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    uniforms = torch.cat([torch.rand(1, dtype=torch.float64, generator=g, device=probs.device) for g in generators])
    tokens = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0].tolist()
    vocab = probs.shape[-1]
    for row, token in enumerate(tokens):
        if token >= vocab:  # the uniform times the total rounded up to the total: the last possible token
            tokens[row] = int(probs[row].nonzero()[-1])
    return tokens


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts), without the copy when the parts are consecutive rows of one tensor (the engine
    passes slices of the step's logits, in order when every sampled chunk verifies drafts)."""
    first = parts[0]
    offset = first.storage_offset()
    for part in parts:
        if (not part.is_contiguous() or part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or part.storage_offset() != offset or part.shape[1:] != first.shape[1:]):
            return torch.cat(parts)
        offset += part.numel()
    return first.as_strided((sum(part.shape[0] for part in parts), *first.shape[1:]), first.stride())


def verify(items: list[tuple[torch.Tensor, SamplingState, Proposal]]
           ) -> list[tuple[list[int], list[TokenLogprob] | None]]:
    """For each (logits [k + 1, vocab] of a verified chunk, the request's state, its k-token proposal):
    the tokens to emit (1 to k + 1) and their logprobs when the request asked for them.

    Every row of every item is adjusted, filtered and normalised in one batch; greedy rows take one argmax
    for all; sampling items draw their k acceptance uniforms at once, then one token each (at the first
    rejection, from the residual; else from the last position), all drawn together."""
    states: list[SamplingState] = []
    for _, state, proposal in items:
        if changes_logits(state):  # penalties and min_tokens see the drafts before each position
            states += [state_after(state, proposal.tokens[:i]) for i in range(len(proposal.tokens) + 1)]
        else:  # nothing depends on the tokens generated: the request's own state serves every position
            states += [state] * (len(proposal.tokens) + 1)
    adjusted, probs = distributions(_joined([rows for rows, _, _ in items]), states)
    greedy_rows = [row for row, state in enumerate(states) if state.params.is_greedy]
    best = (adjusted if len(greedy_rows) == len(states) else adjusted[greedy_rows]).argmax(-1).tolist()

    tokens_of: list[list[int]] = []
    # Sampling items: (index in items, first row in probs); the rows and tokens whose p(d) decides.
    sampling: list[tuple[int, int]] = []
    draft_rows: list[int] = []
    draft_tokens: list[int] = []
    greedy_at = random_at = 0
    for index, (rows, state, proposal) in enumerate(items):
        drafts = proposal.tokens
        if state.params.is_greedy:
            argmax = best[greedy_at : greedy_at + rows.shape[0]]
            kept = 0
            while kept < len(drafts) and drafts[kept] == argmax[kept]:
                kept += 1
            tokens_of.append(drafts[:kept] + [argmax[kept]])
            greedy_at += rows.shape[0]
        else:
            sampling.append((index, random_at))
            draft_rows += range(random_at, random_at + len(drafts))
            draft_tokens += drafts
            tokens_of.append([])
            random_at += rows.shape[0]
    if sampling:
        _accept_sampled(items, sampling, probs, draft_rows, draft_tokens, tokens_of)
    results = []
    for (rows, state, _), tokens in zip(items, tokens_of, strict=True):
        logprobs = None
        if state.params.logprobs is not None:  # under the raw logits: only the params of the state matter
            logprobs = _logprobs(rows[: len(tokens)], [state] * len(tokens), tokens)
        results.append((tokens, logprobs))
    return results


def _accept_sampled(items, sampling: list[tuple[int, int]], probs: torch.Tensor, draft_rows: list[int],
                    draft_tokens: list[int], tokens_of: list[list[int]]) -> None:
    """Rejection sampling for the sampling items: fills their tokens_of entries. Draft d drawn from q is
    kept with probability min(1, p(d) / q(d)); the first rejected position draws from norm(max(0, p - q))."""
    p_drafts = probs[draft_rows, draft_tokens].tolist() if draft_rows else []
    # (row of probs to draw from, rejected draft or None, its q row or None), one per sampling item.
    draws: list[tuple[int, int | None, torch.Tensor | None]] = []
    generators = []
    at = 0
    for index, first_row in sampling:
        _, state, proposal = items[index]
        drafts, k = proposal.tokens, len(proposal.tokens)
        p_d = p_drafts[at : at + k]
        at += k
        q_d = [1.0] * k if proposal.probs is None else proposal.probs[range(k), drafts].tolist()
        uniforms = torch.rand(k, generator=state.generator, device=probs.device).tolist() if k else []
        kept = 0
        while kept < k and uniforms[kept] * q_d[kept] < p_d[kept]:
            kept += 1
        tokens_of[index] = drafts[:kept]
        if kept < k:
            draws.append((first_row + kept, drafts[kept], None if proposal.probs is None else proposal.probs[kept]))
        else:
            draws.append((first_row + k, None, None))
        generators.append(state.generator)
    target = probs[[row for row, _, _ in draws]]
    for i, (_, rejected, q) in enumerate(draws):
        if rejected is None:
            continue
        if q is not None:
            target[i] = (target[i] - q).clamp_min_(0)
        target[i, rejected] = 0  # p(d) < q(d) here, so max(0, p - q) is already 0 at d; exact for point masses
    empty = (target.sum(-1) <= 0).nonzero()[:, 0].tolist()  # p = q exactly: draw from p itself
    if empty:
        target[empty] = probs[[draws[i][0] for i in empty]]
    for (index, _), token in zip(sampling, draw(target, generators), strict=True):
        tokens_of[index].append(token)
