"""Decides what each step computes: one token budget shared by decodes and prefill chunks.

Running sequences are served in arrival order (a decode costs one token, an unfinished prompt takes a
chunk); waiting sequences are admitted while blocks, the sequence limit and the budget allow. While
decodes run, the prefill tokens of a step are further capped by a StepBudget, learnt from the measured
step times, so that a long prompt arriving never stalls the running streams for long. When the cache
runs out of blocks, the newest running sequence is preempted: its blocks are freed and it is recomputed
later from its tokens, which gives the same output.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ember.engine.block_manager import BlockManager
from ember.engine.sequence import Sequence, SequenceStatus
from ember.engine.step_budget import StepBudget

if TYPE_CHECKING:
    from ember.engine.spec_decode import Proposal


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens
    # Logits rows the step returns when it samples: the last token's, or with speculative tokens appended
    # (the `proposal` being verified) the rows of every drafted position too.
    num_logits: int = 1
    proposal: Proposal | None = None
    # Compute each token as a decode row (the kernel plain decoding uses) rather than as a prefill chunk:
    # speculative chunks, whose logits must be the ones decoding token by token would give.
    decode_rows: bool = False

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so the step samples its next token."""
        return self.seq.num_computed_tokens + self.num_tokens == len(self.seq)


def _is_decode(seq: Sequence) -> bool:
    """A stream waiting for its next token (a recomputation after preemption is prefill)."""
    return seq.num_output_tokens > 0 and seq.num_uncomputed_tokens == 1


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.budget = StepBudget(max_batched_tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # What the last schedule() chose, for observe_step().
        self.step_decodes = 0
        self.step_prefill_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_batched_tokens
        prefill_budget = self.budget.prefill_limit(sum(map(_is_decode, self.running)))
        self.step_decodes = self.step_prefill_tokens = 0
        chunks: list[ScheduledChunk] = []
        # Oldest first: a preemption victim (the newest) is then never one already scheduled this step.
        self.running.sort(key=lambda s: s.arrival)
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            decode = _is_decode(seq)
            count = 1 if decode else min(seq.num_uncomputed_tokens, budget, prefill_budget)
            if count == 0:
                continue  # no prefill left this step; younger decodes still run
            if not self._make_room(seq, seq.num_computed_tokens + count):
                continue  # seq itself was preempted
            chunks.append(ScheduledChunk(seq, count))
            budget -= count
            if decode:
                self.step_decodes += 1
            else:
                prefill_budget -= count
                self.step_prefill_tokens += count
        while self.waiting and min(budget, prefill_budget) > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.allocate(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            count = min(seq.num_uncomputed_tokens, budget, prefill_budget)
            chunks.append(ScheduledChunk(seq, count))
            budget -= count
            prefill_budget -= count
            self.step_prefill_tokens += count
        return chunks

    def observe_step(self, seconds: float) -> None:
        """Report how long the step of the last schedule() took, so later steps fit the device's speed."""
        self.budget.observe(self.step_decodes, self.step_prefill_tokens, seconds)

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        while not self.blocks.can_grow(seq, num_tokens):
            victim = max(self.running, key=lambda s: s.arrival)
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq, num_tokens)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.blocks.free_sequence(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
