"""Runs the model on one scheduled step: builds the flat token batch and its paged-attention metadata."""

from __future__ import annotations

import torch

from ember.config import ModelConfig
from ember.engine.scheduler import ScheduledChunk
from ember.layers.attention import AttentionMetadata, PrefillSlice
from ember.models.decoder import CausalLM


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, model: CausalLM, config: ModelConfig, device: torch.device, kv_dtype: torch.dtype,
                 block_size: int, num_blocks: int):
        self.model = model
        self.device = device
        self.block_size = block_size
        slots = num_blocks * block_size
        shape = (config.num_layers, slots, config.num_kv_heads, config.head_dim)
        # Zeroed, not empty: padded positions of a gathered context are masked, but NaN garbage would
        # still poison the weighted sum (0 * NaN).
        self.k_cache = torch.zeros(shape, dtype=kv_dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=kv_dtype, device=device)
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.k_cache = self.k_cache[index]
            layer.self_attn.v_cache = self.v_cache[index]

    def _slots(self, block_table: list[int], start: int, stop: int) -> torch.Tensor:
        positions = torch.arange(start, stop)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def _build(self, chunks: list[ScheduledChunk]):
        decodes = [c for c in chunks if c.num_tokens == 1]
        prefills = [c for c in chunks if c.num_tokens > 1]
        ordered = decodes + prefills
        input_ids: list[int] = []
        positions: list[int] = []
        slot_pieces: list[torch.Tensor] = []
        prefill_slices: list[PrefillSlice] = []
        sample_rows: list[int] = []
        for chunk in ordered:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            stop = start + chunk.num_tokens
            offset = len(input_ids)
            input_ids.extend(seq.token_ids[start:stop])
            positions.extend(range(start, stop))
            slot_pieces.append(self._slots(seq.block_table, start, stop))
            if chunk.num_tokens > 1:
                context = self._slots(seq.block_table, 0, stop).to(self.device) if start else None
                prefill_slices.append(PrefillSlice(offset, chunk.num_tokens, stop, context))
            if chunk.samples:
                sample_rows.append(offset + chunk.num_tokens - 1)
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_pieces).to(self.device), num_decode=len(decodes), prefills=prefill_slices
        )
        if decodes:
            lens = [c.seq.num_computed_tokens + 1 for c in decodes]
            width = self.block_size * max(-(-n // self.block_size) for n in lens)
            tables = torch.zeros(len(decodes), width // self.block_size, dtype=torch.long)
            for row, chunk in enumerate(decodes):
                used = -(-lens[row] // self.block_size)
                tables[row, :used] = torch.tensor(chunk.seq.block_table[:used])
            offsets = torch.arange(self.block_size)
            meta.decode_slots = (tables[:, :, None] * self.block_size + offsets).view(len(decodes), width).to(self.device)
            meta.decode_lens = torch.tensor(lens, device=self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        sampled = [c for c in ordered if c.samples]
        return ids, pos, meta, torch.tensor(sample_rows, device=self.device), sampled

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], torch.Tensor]:
        """Compute the step; return the chunks that sample and their next-token logits [S, vocab] (fp32)."""
        ids, pos, meta, rows, sampled = self._build(chunks)
        hidden = self.model(ids, pos, meta)
        if not sampled:
            return [], torch.empty(0)
        return sampled, self.model.compute_logits(hidden[rows])

    @torch.inference_mode()
    def hidden_states(self, chunk: ScheduledChunk) -> torch.Tensor:
        """Final hidden states of one chunk (used for embeddings)."""
        ids, pos, meta, _, _ = self._build([chunk])
        return self.model(ids, pos, meta)
