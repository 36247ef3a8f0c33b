"""Speculative decoding inside the batching engine: which decodes get drafts, how many, and what they gain.

After the scheduler picks a step's chunks, each decode of a request that allows it gets up to k drafted
tokens (from the n-gram lookup or the draft model) appended, so the one forward of the step verifies the
drafts of every sequence beside the other decodes and prefill chunks. k is per request: it starts at
`spec_tokens`, grows by one when every draft is accepted and halves when none is; at zero the request
decodes plainly for `PROBE_INTERVAL` steps, then tries one draft again. Drafts never preempt anything:
they take only the step's spare token budget and free blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.engine.block_manager import BlockManager
from ember.engine.proposers import DraftModel, NgramProposer, check_same_vocabulary
from ember.engine.scheduler import ScheduledChunk
from ember.engine.spec_decode import Proposal, verify
from ember.layers.sampler import SamplingState, TokenLogprob
from ember.loader.model import LoadedModel

PROBE_INTERVAL = 16  # plain decode steps before a request whose drafts all failed tries again


def acceptance(stats: dict) -> tuple[float, float] | None:
    """(acceptance rate, mean accepted length) from spec_* counters (engine.stats() or differences of two):
    the share of drafted tokens kept, and the tokens a sequence gains per verification (kept drafts plus
    the target's own token). None before anything was verified."""
    verifications = stats.get("spec_verifications", 0)
    if not verifications:
        return None
    proposed, accepted = stats["spec_proposed_tokens"], stats["spec_accepted_tokens"]
    return accepted / proposed, (accepted + verifications) / verifications


@dataclass
class _Pace:
    k: int
    pause: int = 0  # plain steps left before drafting again


@dataclass
class Candidate:
    chunk: ScheduledChunk  # a decode: one token, sampling
    state: SamplingState
    room: int  # tokens the request may still take after this step's own (max_tokens), and the step's budget


class Speculator:
    def __init__(self, spec_tokens: int, ngram: int | None, draft: LoadedModel | None, target: LoadedModel,
                 num_blocks: int, block_size: int, max_batched_tokens: int, max_num_seqs: int):
        self.spec_tokens = spec_tokens
        self.ngram = NgramProposer(ngram) if ngram else None
        self.draft = None
        if draft is not None:
            check_same_vocabulary(target, draft)
            # The draft holds each sequence's tokens plus its drafts: the target's blocks and K more each.
            extra = max_num_seqs * -(-spec_tokens // block_size)
            self.draft = DraftModel(draft, target.config.vocab_size, num_blocks + extra, block_size,
                                    max_batched_tokens)
        self.pace: dict[str, _Pace] = {}
        self.proposed_tokens = 0
        self.accepted_tokens = 0
        self.verifications = 0  # sequence-steps that verified at least one draft

    def release(self, request_id: str) -> None:
        """Forget a finished or aborted request (and free its draft cache blocks)."""
        self.pace.pop(request_id, None)
        if self.draft is not None:
            self.draft.release(request_id)

    def _wanted(self, request_id: str, room: int) -> int:
        pace = self.pace.setdefault(request_id, _Pace(self.spec_tokens))
        if pace.pause:
            pace.pause -= 1
            if pace.pause == 0:
                pace.k = 1
            return 0
        return min(pace.k, room)

    def propose(self, candidates: list[Candidate], blocks: BlockManager) -> None:
        """Append drafts to the candidates' chunks (and sequences) where the target's cache has room."""
        wanted = [(c, self._wanted(c.chunk.seq.request_id, c.room)) for c in candidates]
        wanted = [(c, k) for c, k in wanted if k > 0]
        if not wanted:
            return
        if self.draft is not None:
            proposals = self.draft.propose([(c.chunk.seq, c.state, k) for c, k in wanted])
        else:
            proposals = [Proposal(self.ngram.propose(c.chunk.seq.token_ids, k)) for c, k in wanted]
        for (candidate, _), proposal in zip(wanted, proposals, strict=True):
            chunk, seq = candidate.chunk, candidate.chunk.seq
            count = len(proposal.tokens)
            if not count or not blocks.can_grow(seq, seq.num_computed_tokens + 1 + count):
                continue
            blocks.grow(seq, seq.num_computed_tokens + 1 + count)
            seq.token_ids.extend(proposal.tokens)
            chunk.num_tokens += count
            chunk.num_logits += count
            chunk.proposal = proposal
            chunk.decode_rows = True

    def verify(self, items: list[tuple[ScheduledChunk, torch.Tensor, SamplingState]]
               ) -> list[tuple[list[int], list[TokenLogprob] | None]]:
        """Each verified chunk's emitted tokens (and logprobs); its drafts are taken off its sequence again."""
        results = verify([(rows, state, chunk.proposal) for chunk, rows, state in items])
        for (chunk, _, _), (tokens, _) in zip(items, results, strict=True):
            drafted = len(chunk.proposal.tokens)
            del chunk.seq.token_ids[len(chunk.seq) - drafted :]
            accepted = len(tokens) - 1
            self.proposed_tokens += drafted
            self.accepted_tokens += accepted
            self.verifications += 1
            pace = self.pace[chunk.seq.request_id]
            if accepted == drafted:
                pace.k = min(pace.k + 1, self.spec_tokens)
            elif accepted == 0:
                pace.k //= 2
                if pace.k == 0:
                    pace.pause = PROBE_INTERVAL
        return results

    def stats(self) -> dict:
        return {
            "spec_proposed_tokens": self.proposed_tokens,
            "spec_accepted_tokens": self.accepted_tokens,
            "spec_verifications": self.verifications,
            **({"draft_kv_blocks_used": self.draft.blocks.num_used_blocks} if self.draft is not None else {}),
        }
