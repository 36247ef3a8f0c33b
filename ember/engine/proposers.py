"""Where drafted tokens come from: an n-gram lookup in the sequence itself, or a small draft model.

The draft model keeps its own paged KV cache (a second BlockManager over its own ModelRunner) with one
shadow sequence per request. Before proposing, a shadow is brought in line with its request's verified
tokens: K/V computed for rejected drafts is dropped (the common prefix is kept), then the draft computes
what it has not seen yet in one chunk and drafts the rest one token at a time, every sequence batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from ember.engine.block_manager import BlockManager
from ember.engine.model_runner import ModelRunner
from ember.engine.scheduler import ScheduledChunk
from ember.engine.sequence import Sequence
from ember.engine.spec_decode import Proposal, distributions, draw, state_after
from ember.errors import InvalidParameter
from ember.layers.sampler import SamplingState
from ember.loader.model import LoadedModel


class NgramProposer:
    """Prompt lookup: find the sequence's last n tokens earlier in its prompt + output (n from `max_n` down
    to 1) and propose what followed their first occurrence."""

    def __init__(self, max_n: int):
        self.max_n = max_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        ids = np.asarray(token_ids)
        for n in range(min(self.max_n, len(ids) - 1), 0, -1):
            # Windows of ids[:-1] start at most at len - 1 - n: never the suffix itself, and always
            # followed by at least one token.
            matches = np.flatnonzero((sliding_window_view(ids[:-1], n) == ids[-n:]).all(axis=1))
            if matches.size:
                start = int(matches[0]) + n
                return ids[start : start + k].tolist()
        return []


def check_same_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    """Drafted ids are verified as target ids: the two tokenizers must map the same text to the same ids."""
    ours, theirs = target.tokenizer.hf.get_vocab(with_added_tokens=True), draft.tokenizer.hf.get_vocab(True)
    if ours != theirs:
        differ = len(set(ours.items()) ^ set(theirs.items()))
        raise InvalidParameter("draft", f"{draft.name} has a different vocabulary from {target.name} "
                               f"({len(theirs)} vs {len(ours)} tokens, {differ} entries differ); a draft model "
                               "must share the target's tokenizer")


@dataclass
class _Shadow:
    seq: Sequence  # the draft's copy: its tokens, blocks and computed count in the draft's cache
    synced: int = 0  # leading tokens known equal to the request's (requests only ever append tokens)


class DraftModel:
    def __init__(self, loaded: LoadedModel, vocab_size: int, num_blocks: int, block_size: int,
                 max_batched_tokens: int):
        config = loaded.config
        self.name = loaded.name
        self.vocab_size = vocab_size  # the target's logits width: the draft's are cut or padded to it
        self.max_len = config.max_position_embeddings
        self.max_batched_tokens = max_batched_tokens
        self.blocks = BlockManager(num_blocks, block_size, salt=f"draft:{loaded.name}")
        self.runner = ModelRunner(loaded.model, config, loaded.device, loaded.dtype, block_size, num_blocks)
        self.shadows: dict[str, _Shadow] = {}

    def release(self, request_id: str) -> None:
        shadow = self.shadows.pop(request_id, None)
        if shadow is not None:
            self.blocks.free_sequence(shadow.seq)

    def _sync(self, seq: Sequence, k: int) -> _Shadow | None:
        """The request's shadow, holding its verified tokens and room for k - 1 drafts; None if no room."""
        if len(seq) + k > self.max_len:
            return None
        shadow = self.shadows.get(seq.request_id)
        if shadow is None:
            shadow = _Shadow(Sequence(seq.request_id, seq.token_ids, None))
            if not self.blocks.allocate(shadow.seq):
                return None
            self.shadows[seq.request_id] = shadow
        else:
            own = shadow.seq
            common = shadow.synced
            limit = min(len(own), len(seq))
            while common < limit and own.token_ids[common] == seq.token_ids[common]:
                common += 1
            own.token_ids = list(seq.token_ids)
            # At least the last token is recomputed: its logits start the drafting.
            own.num_computed_tokens = min(own.num_computed_tokens, common, len(own) - 1)
            self.blocks.truncate(own, own.num_computed_tokens)
            self.blocks.register_computed(own)
        shadow.synced = len(seq)
        needed = len(seq) + k - 1  # the last draft is proposed, never computed
        if not self.blocks.can_grow(shadow.seq, needed):
            return None
        self.blocks.grow(shadow.seq, needed)
        return shadow

    def _run(self, chunks: list[ScheduledChunk]) -> dict[int, torch.Tensor]:
        """Compute `chunks` in the draft's cache; next-token logits (in the target's width) of those that
        reach their sequence's end, by id of the sequence."""
        sampled, logits, _ = self.runner.run(chunks)  # the draft never scores prompts
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        width = logits.shape[-1] if sampled else self.vocab_size
        if width > self.vocab_size:
            logits = logits[:, : self.vocab_size]
        elif width < self.vocab_size:  # ids the draft cannot produce: never proposed
            logits = torch.nn.functional.pad(logits, (0, self.vocab_size - width), value=float("-inf"))
        return {id(chunk.seq): row for chunk, row in zip(sampled, logits, strict=True)}

    def propose(self, items: list[tuple[Sequence, SamplingState, int]]) -> list[Proposal]:
        """Up to k drafted tokens for each (request's sequence, its sampling state, k)."""
        proposals = [Proposal([]) for _ in items]
        live = []  # (index, shadow, state, k)
        for index, (seq, state, k) in enumerate(items):
            shadow = self._sync(seq, k)
            if shadow is not None:
                live.append((index, shadow, state, k))
        drafts: dict[int, list[torch.Tensor]] = {index: [] for index, *_ in live}
        # Catch up on the tokens the draft has not computed (a whole prompt the first time), in chunks.
        pending, logits = list(live), {}
        while pending:
            chunks = [ScheduledChunk(shadow.seq, min(shadow.seq.num_uncomputed_tokens, self.max_batched_tokens))
                      for _, shadow, _, _ in pending]
            for chunk in chunks:
                # In steady state the last accepted draft and the target's own token: computed as the
                # target computed them (decode rows), so a draft identical to the target agrees exactly.
                chunk.decode_rows = chunk.num_tokens <= 2
            logits.update(self._run(chunks))
            pending = [entry for entry in pending if id(entry[1].seq) not in logits]
        active = list(live)
        while active:
            step_logits = torch.stack([logits[id(shadow.seq)] for _, shadow, _, _ in active])
            views = [state_after(state, proposals[index].tokens) for index, _, state, _ in active]
            adjusted, probs = distributions(step_logits, views)
            greedy = [row for row, (_, _, state, _) in enumerate(active) if state.params.is_greedy]
            tokens = dict(zip(greedy, adjusted[greedy].argmax(-1).tolist(), strict=True)) if greedy else {}
            if probs is not None:
                sampled = [row for row in range(len(active)) if row not in tokens]
                drawn = draw(probs, [active[row][2].generator for row in sampled])
                for at, (row, token) in enumerate(zip(sampled, drawn, strict=True)):
                    tokens[row] = token
                    drafts[active[row][0]].append(probs[at])
            for row, (index, _, _, _) in enumerate(active):
                proposals[index].tokens.append(tokens[row])
            active = [entry for entry in active if len(proposals[entry[0]].tokens) < entry[3]]
            for index, shadow, _, _ in active:
                shadow.seq.token_ids.append(proposals[index].tokens[-1])
            if active:
                logits = self._run([ScheduledChunk(shadow.seq, 1) for _, shadow, _, _ in active])
        for index, rows in drafts.items():
            if rows:
                proposals[index].probs = torch.stack(rows)
        return proposals
