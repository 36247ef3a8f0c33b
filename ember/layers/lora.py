"""LoRA's low-rank path, added beside every projection of every decoder layer (all families share it).

`attach_lora` wraps each layer's q/k/v/o and gate/up/down projections (and the fused q/k/v and gate/up calls)
once; the base weights are untouched (quantized ones stay quantized: nothing is merged). Each wrapper keeps
the (A, B) pairs of the adapters loaded into it, by slot. Before a step, the model runner sets `batch`: which
rows of the flat batch use which adapter. A projection then adds, per adapter present in the step,
y[rows] += (x[rows] A^T) B^T (the adapter's scale is folded into B): one gather, two small matmuls and one
index_add per adapter, and nothing at all in a step without adapters.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.norm import RMSNorm

Pair = tuple[torch.Tensor, torch.Tensor]  # A [r, in], B [out, r] (scaled)


class LoraBatch:
    """Which adapter each row of a step's flat batch uses, as (slot, rows) groups; rows None: every row."""

    def __init__(self, groups: list[tuple[int, torch.Tensor | None]]):
        self.groups = groups

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
        return cls([(slot, torch.tensor(rows[slot], dtype=torch.long, device=device)) for slot in present])


class LoraLayers:
    """The wrapped projections of one model, and the step's batch they read."""

    def __init__(self):
        self.batch: LoraBatch | None = None
        self.modules: dict[str, LoraLinear] = {}

    def add(self, slot: int, pairs: dict[str, Pair]) -> None:
        for name, pair in pairs.items():
            self.modules[name].pairs[slot] = pair

    def remove(self, slot: int) -> None:
        for module in self.modules.values():
            module.pairs.pop(slot, None)


class LoraLinear(nn.Module):
    """A projection plus the low-rank paths of the adapters loaded into it."""

    def __init__(self, base: nn.Module, layers: LoraLayers):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.pairs: dict[int, Pair] = {}
        self._layers = layers  # a plain reference: the shared state is no submodule

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
