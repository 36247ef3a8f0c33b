"""LoRA's low-rank path, added beside every projection of every decoder layer (all families share it).

`attach_lora` wraps each layer's q/k/v/o and gate/up/down projections (and the fused q/k/v and gate/up calls)
once; the base weights are untouched (quantized ones stay quantized: nothing is merged). Each wrapper keeps
the (A, B) pairs of the adapters loaded into it, by slot. Before a step, the model runner sets `batch`: which
rows of the flat batch use which adapter. A projection then adds y = x A^T B^T row by row with each row's own
adapter (the adapter's scale is folded into B), in one of two ways:

* one adapter for every row: two small matmuls;
* rows of several adapters: the loaded adapters' A stacked into [sum of ranks, in] and B into
  [out, sum of ranks]; h = x A_all^T, then each row keeps only its own adapter's columns (a 0/1 mask) and
  y += h B_all^T. Two matmuls and one multiply whatever the mix: measured faster on CPUs than a loop over the
  adapters present (gather, two matmuls and index_add each) and than gathering each row's A/B for a bmm
  (benchmarks/lora.py). Past MAX_STACKED_RANK the masked work would outgrow that; then the loop runs.

A step without adapters costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.norm import RMSNorm

Pair = tuple[torch.Tensor, torch.Tensor]  # A [r, in], B [out, r] (scaled)
MAX_STACKED_RANK = 512  # the loaded adapters' ranks summed, up to which a mixed step uses the stacked form


class LoraBatch:
    """Which adapter each row of a step's flat batch uses, as (slot, rows) groups; rows None: every row."""

    def __init__(self, groups: list[tuple[int, torch.Tensor | None]], row_slots: torch.Tensor | None = None):
        self.groups = groups
        self.row_slots = row_slots  # [rows, 1] each row's slot, when several adapters (or some base rows) mix
        self._masks: dict[int, torch.Tensor] = {}  # by column layout: projections with the same adapters share it

    def mask(self, col_slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[rows, sum of ranks]: 1 where a stacked column belongs to the row's adapter."""
        key = (id(col_slots), dtype)  # col_slots are interned (LoraLayers.columns): alive for the whole step
        if key not in self._masks:
            self._masks[key] = (self.row_slots == col_slots).to(dtype)
        return self._masks[key]

    @classmethod
    def from_rows(cls, slots: list[int], device: torch.device) -> LoraBatch | None:
        """Groups for per-row slots (0: the base model); None when no row uses an adapter."""
        present = sorted(set(slots) - {0})
        if not present:
            return None
        if len(present) == 1 and 0 not in slots:
            return cls([(present[0], None)])
        rows: dict[int, list[int]] = {slot: [] for slot in present}
        for row, slot in enumerate(slots):
            if slot:
                rows[slot].append(row)
        return cls([(slot, torch.tensor(rows[slot], dtype=torch.long, device=device)) for slot in present],
                   torch.tensor(slots, device=device)[:, None])


class LoraLayers:
    """The wrapped projections of one model, and the step's batch they read."""

    def __init__(self):
        self.batch: LoraBatch | None = None
        self.modules: dict[str, LoraLinear] = {}
        self._columns: dict[tuple, torch.Tensor] = {}

    def columns(self, ranks: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
        """The slot of each stacked column for adapters of these (slot, rank)s: one tensor per layout, shared by
        the projections with that layout, so a step computes each mask once."""
        if ranks not in self._columns:
            self._columns[ranks] = torch.cat([torch.full((rank,), slot, dtype=torch.long, device=device)
                                              for slot, rank in ranks])
        return self._columns[ranks]

    def add(self, slot: int, pairs: dict[str, Pair]) -> None:
        for name, pair in pairs.items():
            module = self.modules[name]
            module.set_pairs({**module.pairs, slot: pair})

    def remove(self, slot: int) -> None:
        for module in self.modules.values():
            if slot in module.pairs:
                module.set_pairs({s: p for s, p in module.pairs.items() if s != slot})


class LoraLinear(nn.Module):
    """A projection plus the low-rank paths of the adapters loaded into it."""

    def __init__(self, base: nn.Module, layers: LoraLayers):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.pairs: dict[int, Pair] = {}
        self._layers = layers  # a plain reference: the shared state is no submodule
        self._stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # A_all, B_all, column slots

    def set_pairs(self, pairs: dict[int, Pair]) -> None:
        """The adapters of this projection by slot; the stacked form is rebuilt from them."""
        self.pairs = pairs
        self._stacked = None
        if pairs and sum(a.shape[0] for a, _ in pairs.values()) <= MAX_STACKED_RANK:
            a_all = torch.cat([a for a, _ in pairs.values()])
            b_all = torch.cat([b for _, b in pairs.values()], dim=1)
            ranks = tuple((slot, a.shape[0]) for slot, (a, _) in pairs.items())
            self._stacked = (a_all, b_all, self._layers.columns(ranks, a_all.device))

    def _groups(self) -> Iterator[tuple[Pair, torch.Tensor | None]]:
        batch = self._layers.batch
        if batch is None or not self.pairs:
            return
        for slot, rows in batch.groups:
            pair = self.pairs.get(slot)
            if pair is not None:
                yield pair, rows

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y [..., out] += this step's adapters' low-rank outputs for input x [..., in], in place."""
        x2, y2 = x.reshape(-1, self.in_features), y.view(-1, self.out_features)
        batch = self._layers.batch
        if batch is not None and batch.row_slots is not None and self._stacked is not None and self.pairs:
            a_all, b_all, cols = self._stacked
            h = F.linear(x2.to(a_all.dtype), a_all).mul_(batch.mask(cols, a_all.dtype))
            y2.add_(F.linear(h, b_all).to(y2.dtype))
            return
        for (a, b), rows in self._groups():
            if rows is None:
                y2.add_(F.linear(F.linear(x2.to(a.dtype), a), b).to(y2.dtype))
            else:
                delta = F.linear(F.linear(x2.index_select(0, rows).to(a.dtype), a), b)
                y2.index_add_(0, rows, delta.to(y2.dtype))

    @property
    def active(self) -> bool:
        return next(self._groups(), None) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        self.add_delta(x, y)
        return y

    def silu_gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The base's fused silu(gate) * up product (ember.quant.linear), plus the low-rank path on that product,
        formed here only when an adapter of this step changes this projection."""
        y = self.base.silu_gated(gate_up)
        if self.active:
            gate, up = gate_up.chunk(2, dim=-1)
            self.add_delta(F.silu(gate) * up, y)
        return y


class LoraFused(nn.Module):
    """A fused q/k/v or gate/up call (ember.quant.linear.FusedLinear) plus each part's low-rank path. `norm`: the
    RMSNorm the fused kernel applies itself, which the low-rank path applies to its own input."""

    def __init__(self, fused: nn.Module, parts: list[LoraLinear], norm: RMSNorm | None):
        super().__init__()
        self.fused = fused
        self.sizes = fused.sizes
        self._parts = parts  # registered where they are
        self._norm = norm

    def _add(self, x: torch.Tensor, outs) -> None:
        if any(part.active for part in self._parts):
            x = x if self._norm is None else self._norm(x)
            for part, out in zip(self._parts, outs, strict=True):
                part.add_delta(x, out)

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fused.joined(x)
        self._add(x, y.split(self.sizes, dim=-1))
        return y

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.fused(x)
        self._add(x, outs)
        return outs


def attach_lora(model: nn.Module) -> LoraLayers:
    """Wrap every decoder layer's projections of `model` (a CausalLM) once; returns their shared state."""
    layers = LoraLayers()
    for index, layer in enumerate(model.model.layers):
        for block_name, block, parts in (("self_attn", layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                         ("mlp", layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for part in parts:
                wrapped = LoraLinear(getattr(block, part), layers)
                setattr(block, part, wrapped)
                layers.modules[f"model.layers.{index}.{block_name}.{part}"] = wrapped
        attn, mlp = layer.self_attn, layer.mlp
        folded = layer.norms_in_projections  # the fused calls apply the layer's norms themselves
        if attn.qkv_proj is not None:
            attn.qkv_proj = LoraFused(attn.qkv_proj, [attn.q_proj, attn.k_proj, attn.v_proj],
                                      layer.input_layernorm if folded else None)
        if mlp.gate_up_proj is not None:
            mlp.gate_up_proj = LoraFused(mlp.gate_up_proj, [mlp.gate_proj, mlp.up_proj],
                                         layer.post_attention_layernorm if folded else None)
    return layers
