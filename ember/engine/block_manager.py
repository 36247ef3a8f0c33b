"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts and the prefix cache.

A full block is identified by a hash chained over every token before it (and a salt naming the model and
the sequence's LoRA adapter), so two sequences sharing a prefix under the same weights share its blocks. Freed blocks keep their hash and sit in an LRU list;
a later request with the same prefix revives them, and allocation takes the least recently freed first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from ember.engine.sequence import Sequence


class Block:
    __slots__ = ("id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, salt: str = ""):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.cached: dict[bytes, int] = {}  # hash -> block id, for full computed blocks
        self.salt = hashlib.sha256(salt.encode()).digest()
        self.hit_tokens = 0
        self.miss_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _chain_hash(self, parent: bytes, tokens: list[int]) -> bytes:
        return hashlib.blake2b(parent + b"".join(t.to_bytes(4, "little") for t in tokens), digest_size=16).digest()

    def _salt(self, seq: Sequence) -> bytes:
        return self.salt + seq.cache_salt

    def _prefix_hashes(self, seq: Sequence) -> list[bytes]:
        hashes, parent = [], self._salt(seq)
        for start in range(0, len(seq) - self.block_size + 1, self.block_size):
            parent = self._chain_hash(parent, seq.token_ids[start : start + self.block_size])
            hashes.append(parent)
        return hashes

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash = None
        block.ref_count = 1
        return block_id

    def allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks; False if short."""
        hashes = self._prefix_hashes(seq)
        # Keep at least one token to compute: the step that samples the next token needs its logits.
        max_hits = (len(seq) - 1) // self.block_size if seq.reuses_prefix_cache else 0
        hits = []
        for h in hashes[:max_hits]:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        fresh_needed = self.blocks_needed(len(seq)) - len(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if fresh_needed > self.num_free_blocks - revived:
            return False
        for block_id in hits:
            self._take(block_id)
        seq.block_table = hits + [self._take_fresh() for _ in range(fresh_needed)]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        self.hit_tokens += seq.num_cached_tokens
        self.miss_tokens += len(seq) - seq.num_cached_tokens
        return True

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make room for `num_tokens` tokens in total (call can_grow first)."""
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._take_fresh())

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Free the tail blocks past the first `num_tokens` tokens (K/V of rejected speculative tokens).
        They were never registered (only verified full blocks are), so they go to the front of the free
        list: the first to be reused, ahead of blocks whose cached prefix may still be revived."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block.id] = None
                self.free.move_to_end(block.id, last=False)

    def register_computed(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed full blocks to the prefix cache."""
        full = min(seq.num_computed_tokens, len(seq)) // self.block_size
        if full <= seq.num_hashed_blocks:
            return
        parent = (self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks
                  else self._salt(seq))
        for index in range(seq.num_hashed_blocks, full):
            start = index * self.block_size
            parent = self._chain_hash(parent, seq.token_ids[start : start + self.block_size])
            block = self.blocks[seq.block_table[index]]
            block.hash = parent
            self.cached.setdefault(parent, block.id)
        seq.num_hashed_blocks = full

    def free_sequence(self, seq: Sequence) -> None:
        # Tail blocks are freed first so that shared prefixes are the last to be evicted.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
