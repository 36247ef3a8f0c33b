"""Runs the model on one scheduled step: builds the flat token batch and its paged-attention metadata."""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch

from ember.config import ModelConfig
from ember.engine.scheduler import ScheduledChunk
from ember.engine.sequence import Sequence
from ember.kernels.decode_layers import DecodeLayers
from ember.layers import kv_cache
from ember.layers.attention import AttentionMetadata, PrefillSlice
from ember.layers.lora import LoraBatch, LoraLayers
from ember.models import native_decode
from ember.models.decoder import CausalLM


@dataclass
class PromptScores:
    """Logits of a sequence's prompt positions first.. computed in one step: row i predicts token first + i + 1."""

    seq: Sequence
    first: int
    logits: torch.Tensor


@dataclass
class _LogitPlan:
    rows: torch.Tensor | None  # hidden rows to compute logits for; None: all of them
    sample_index: list[int] | None  # the sampled chunks' rows among those; None: all of them
    scored: list[tuple[ScheduledChunk, int, int]]


def _zeroed_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled cache tensor. Zeroed, not empty: padded positions of a gathered context are masked,
    but NaN garbage would still poison the weighted sum (0 * NaN).

    On CPU it lives in an anonymous memory map, whose pages the OS hands out zeroed on first write: the cache
    takes RAM as tokens fill it, not all at once (torch.zeros would write, and so commit, every page)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class ModelRunner:
    def __init__(self, model: CausalLM, config: ModelConfig, device: torch.device, kv_dtype: torch.dtype,
                 block_size: int, num_blocks: int, kv_cache_dtype: str = "auto"):
        """`kv_dtype`: the activation dtype, the cache's for kv_cache_dtype "auto"; a quantized cache
        (ember.layers.kv_cache) holds its values and, beside them, one scale per token and KV head."""
        self.model = model
        self.device = device
        self.block_size = block_size
        slots = num_blocks * block_size
        shape = (config.num_layers, slots, config.num_kv_heads, config.head_dim)
        quantized = kv_cache_dtype != "auto"
        storage = kv_cache.CACHE_DTYPES[kv_cache_dtype] if quantized else kv_dtype
        self.k_cache = _zeroed_cache(shape, storage, device)
        self.v_cache = _zeroed_cache(shape, storage, device)
        self.k_scale = _zeroed_cache(shape[:3], kv_cache.SCALE_DTYPE, device) if quantized else None
        self.v_scale = _zeroed_cache(shape[:3], kv_cache.SCALE_DTYPE, device) if quantized else None
        for index, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            attn.k_cache, attn.v_cache = self.k_cache[index], self.v_cache[index]
            # None for a float cache: the model may have run on a quantized cache before (another runner).
            attn.k_scale = self.k_scale[index] if quantized else None
            attn.v_scale = self.v_scale[index] if quantized else None
        self._scratch: dict = {}  # the attention layers' gather buffers, reused by every step
        self.lora: LoraLayers | None = None  # the model's low-rank paths, once an adapter is loaded
        self._native_layers: DecodeLayers | None = None  # built at the first decode-only step
        self._native_checked = False

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the allocated cache: K and V values, and their scales when quantized."""
        tensors = (self.k_cache, self.v_cache, self.k_scale, self.v_scale)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _slots(self, block_table: list[int], start: int, stop: int) -> list[int]:
        """Cache slots of positions start..stop-1, whole blocks at a time."""
        size = self.block_size
        first = start // size
        slots: list[int] = []
        for block in block_table[first : -(-stop // size)]:
            slots.extend(range(block * size, block * size + size))
        skip = start - first * size
        return slots[skip : skip + stop - start]

    def _first_slot(self, blocks: list[int]) -> int | None:
        """The first cache slot of `blocks` when they are consecutive: attention reads them as one slice."""
        first = blocks[0]
        if blocks[-1] - first == len(blocks) - 1 and blocks == list(range(first, first + len(blocks))):
            return first * self.block_size
        return None

    def _build(self, chunks: list[ScheduledChunk]):
        """Flat inputs of one step; every tensor is built once from a flat Python list."""
        size = self.block_size
        # A chunk verifying drafted tokens is computed as one decode row per token (each attends to the
        # cache up to its own position, the drafts before it included: every layer writes the step's K/V
        # before attending), so its logits come from the same kernel as plain decoding's.
        decodes = [c for c in chunks if c.num_tokens == 1 or c.decode_rows]
        prefills = [c for c in chunks if c.num_tokens > 1 and not c.decode_rows]
        ordered = decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        lens: list[int] = []
        tables: list[list[int]] = []  # each decode row's block table
        for chunk in decodes:
            seq = chunk.seq
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + chunk.num_tokens):
                input_ids.append(seq.token_ids[pos])
                positions.append(pos)
                slots.append(seq.block_table[pos // size] * size + pos % size)
                lens.append(pos + 1)
                tables.append(seq.block_table)
        prefill_slices: list[PrefillSlice] = []
        for chunk in prefills:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            stop = start + chunk.num_tokens
            offset = len(input_ids)
            input_ids.extend(seq.token_ids[start:stop])
            positions.extend(range(start, stop))
            slots.extend(self._slots(seq.block_table, start, stop))
            piece = PrefillSlice(offset, chunk.num_tokens, stop)
            if start:  # attends to cached K/V too: read its context from the cache
                blocks = seq.block_table[: -(-stop // size)]
                first_slot = self._first_slot(blocks)
                if first_slot is None:
                    piece.context_blocks = torch.tensor(blocks, dtype=torch.long, device=self.device)
                else:
                    piece.context_start = first_slot
            prefill_slices.append(piece)
        # Rows that need logits: each sampling chunk's last `num_logits` (one per token it samples), and the
        # prompt positions of a sequence that scores its prompt (position p's logits give the log-probability
        # of prompt token p + 1).
        logit_rows: list[int] = []
        sample_index: list[int] = []  # where the sampled chunks' rows sit in logit_rows
        scored: list[tuple[ScheduledChunk, int, int]] = []  # (chunk, first position, first index in logit_rows)
        offset = 0
        for chunk in ordered:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            last = min(start + chunk.num_tokens, seq.num_prompt_tokens - 1)
            if seq.wants_prompt_logprobs and last > start:
                scored.append((chunk, start, len(logit_rows)))
                logit_rows.extend(range(offset, offset + last - start))
            offset += chunk.num_tokens
            if chunk.samples:
                sample_index.extend(range(len(logit_rows), len(logit_rows) + chunk.num_logits))
                logit_rows.extend(range(offset - chunk.num_logits, offset))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device), block_size=size,
            num_decode=len(lens), prefills=prefill_slices, scratch=self._scratch,
        )
        if decodes:
            width = max(lens)
            per_seq = -(-width // size)
            first_slot = self._first_slot(tables[0][:per_seq]) if len(lens) == 1 else None
            if first_slot is not None:
                meta.decode_start = first_slot
            else:
                # Every decode reads the blocks of `width` keys; past a shorter context it reads block 0
                # (masked), and the keys past `width` in its last block are trimmed off.
                flat: list[int] = []
                for table, n in zip(tables, lens, strict=True):
                    used = -(-n // size)
                    flat.extend(table[:used])
                    flat.extend([0] * (per_seq - used))
                meta.decode_blocks = torch.tensor(flat, dtype=torch.long, device=self.device)
            meta.decode_lens = torch.tensor(lens, device=self.device)
            meta.decode_width = width
            meta.decode_padded = min(lens) != width
        if decodes and not prefills and self.lora is None:
            meta.native_layers = self.native_layers()
        if self.lora is not None:  # which rows use which adapter, in the order of the rows above
            row_slots = [chunk.seq.lora_slot for chunk in ordered for _ in range(chunk.num_tokens)]
            self.lora.batch = LoraBatch.from_rows(row_slots, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        sampled = [c for c in ordered if c.samples]
        rows = None
        if len(logit_rows) != len(input_ids):
            rows = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
        plan = _LogitPlan(rows, sample_index if scored else None, scored)
        return ids, pos, meta, plan, sampled

    def native_layers(self) -> DecodeLayers | None:
        """The model's layers over this runner's cache as one native call for decode-only steps, or None where
        that does not apply (ember.models.native_decode); LoRA steps never use it (adapters wrap the layers)."""
        if not self._native_checked and self.device.type == "cpu":
            self._native_layers = native_decode.build(self.model.model)
        self._native_checked = True
        return self._native_layers

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], torch.Tensor, list[PromptScores]]:
        """Compute the step; return the chunks that sample, their next-token logits (fp32, `num_logits` rows per
        chunk in the order of the returned chunks), and the logits of the prompt positions computed for
        sequences that score their prompt."""
        ids, pos, meta, plan, sampled = self._build(chunks)
        hidden = self.model(ids, pos, meta)
        if not plan.scored and not sampled:
            return [], torch.empty(0), []
        # Logits only for the rows that need them (an all-decode step samples every row: no gather).
        logits = self.model.compute_logits(hidden if plan.rows is None else hidden.index_select(0, plan.rows))
        scored = [PromptScores(chunk.seq, first, logits[at : at + min(first + chunk.num_tokens,
                                                                     chunk.seq.num_prompt_tokens - 1) - first])
                  for chunk, first, at in plan.scored]
        if plan.sample_index is not None:
            logits = logits[plan.sample_index]
        return sampled, logits, scored

    @torch.inference_mode()
    def hidden_states(self, chunk: ScheduledChunk) -> torch.Tensor:
        """Final hidden states of one chunk (used for embeddings)."""
        ids, pos, meta, _, _ = self._build([chunk])
        return self.model(ids, pos, meta)
