"""LoRA's low-rank path, added beside every projection of every decoder layer (all families share it).

`attach_lora` wraps each layer's q/k/v/o and gate/up/down projections (and the fused q/k/v and gate/up calls)
once; the base weights are untouched (quantized ones stay quantized: nothing is merged). Each wrapper holds
the (A, B) pairs of the adapters loaded into it once, stacked: A_all [sum of ranks, in] and B_all^T [sum of
ranks, out] (transposed: each column's outputs contiguous for the native kernel); each adapter's columns are a
span of a StackLayout. Before a step, the model runner sets `batch`: which rows of the
flat batch use which adapter. A projection then adds y = x A^T B^T row by row with each row's own adapter (the
adapter's scale is folded into B), in the first of these that applies:

* the native kernel (ember/kernels/lora.c; CPU, float32 activations, adapters in float32 or bfloat16): one
  call over the stacked pairs, each row given its adapter's column range: each row multiplies only its own
  adapter's columns, whatever the mix, and B is read once per call;
* rows of several adapters: h = x A_all^T, then each row keeps only its own adapter's columns (a 0/1 mask) and
  y += h B_all^T. Two matmuls and one multiply whatever the mix: measured faster than a loop over the adapters
  present and than gathering each row's A/B for a bmm (benchmarks/lora.py). Past MAX_STACKED_RANK the masked
  work would outgrow that; then the loop runs;
* one adapter for every row: two small matmuls; else a loop over the adapters present.

A step without adapters costs nothing. The adapters' dtype is the registry's (ember.engine.lora).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels.lora import lora_delta
from ember.layers.norm import RMSNorm

Pair = tuple[torch.Tensor, torch.Tensor]  # A [r, in], B [out, r] (scaled)
MAX_STACKED_RANK = 512  # the loaded adapters' ranks summed, up to which a mixed step uses the stacked form


class StackLayout:
    """Which adapter each stacked column belongs to, for one order of (slot, rank)s: `cols` the slot of each
    column, `spans` each slot's columns [lo, hi). Interned (LoraLayers.layout): the projections with the same
    adapters share one, so a step computes each mask and range table once."""

    def __init__(self, ranks: tuple[tuple[int, int], ...], device: torch.device):
        self.cols = torch.cat([torch.full((rank,), slot, dtype=torch.long, device=device) for slot, rank in ranks])
        self.spans: dict[int, tuple[int, int]] = {}
        for slot, rank in ranks:
            lo = sum(span[1] - span[0] for span in self.spans.values())
            self.spans[slot] = (lo, lo + rank)


class LoraBatch:
    """Which adapter each row of a step's flat batch uses: `slots` per row (0: the base model), as (slot, rows)
    groups (rows None: every row)."""

    def __init__(self, slots: list[int], groups: list[tuple[int, torch.Tensor | None]],
                 row_slots: torch.Tensor | None = None):
        self.slots = slots
        self.groups = groups
        self.row_slots = row_slots  # [rows, 1] each row's slot, when several adapters (or some base rows) mix
        self._masks: dict[tuple, torch.Tensor] = {}  # by layout and dtype
        self._ranges: dict[int, torch.Tensor | None] = {}  # by layout

    def mask(self, layout: StackLayout, dtype: torch.dtype) -> torch.Tensor:
        """[rows, sum of ranks]: 1 where a stacked column belongs to the row's adapter."""
        key = (id(layout), dtype)  # layouts are interned: alive for the whole step
        if key not in self._masks:
            self._masks[key] = (self.row_slots == layout.cols).to(dtype)
        return self._masks[key]

    def ranges(self, layout: StackLayout) -> torch.Tensor | None:
        """int32 [2, rows]: each row's stacked columns [lo, hi) in `layout` (lo == hi: none); None when no row
        uses one of its adapters."""
        key = id(layout)
        if key not in self._ranges:
            spans = [layout.spans.get(slot, (0, 0)) for slot in self.slots]
            used = any(hi > lo for lo, hi in spans)
            self._ranges[key] = torch.tensor(spans, dtype=torch.int32).t().contiguous() if used else None
        return self._ranges[key]

    @classmethod
    def from_rows(cls, slots: list[int], device: torch.device) -> LoraBatch | None:
        """Groups for per-row slots (0: the base model); None when no row uses an adapter."""
        present = sorted(set(slots) - {0})
        if not present:
            return None
        if len(present) == 1 and 0 not in slots:
            return cls(slots, [(present[0], None)])
        rows: dict[int, list[int]] = {slot: [] for slot in present}
        for row, slot in enumerate(slots):
            if slot:
                rows[slot].append(row)
        return cls(slots, [(slot, torch.tensor(rows[slot], dtype=torch.long, device=device)) for slot in present],
                   torch.tensor(slots, device=device)[:, None])


class LoraLayers:
    """The wrapped projections of one model, and the step's batch they read."""

    def __init__(self):
        self.batch: LoraBatch | None = None
        self.modules: dict[str, LoraLinear] = {}
        self._layouts: dict[tuple, StackLayout] = {}

    def layout(self, ranks: tuple[tuple[int, int], ...], device: torch.device) -> StackLayout:
        """The one StackLayout for adapters of these (slot, rank)s."""
        if ranks not in self._layouts:
            self._layouts[ranks] = StackLayout(ranks, device)
        return self._layouts[ranks]

    def add(self, slot: int, pairs: dict[str, Pair]) -> None:
        for name, pair in pairs.items():
            self.modules[name].add(slot, pair)

    def remove(self, slot: int) -> None:
        for module in self.modules.values():
            module.remove(slot)


class LoraLinear(nn.Module):
    """A projection plus the low-rank paths of the adapters loaded into it, held once: stacked."""

    def __init__(self, base: nn.Module, layers: LoraLayers):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self._layers = layers  # a plain reference: the shared state is no submodule
        self._stacked: tuple[torch.Tensor, torch.Tensor, StackLayout] | None = None  # A_all, B_all^T, their layout

    @property
    def pairs(self) -> dict[int, Pair]:
        """Each loaded adapter's (A, B) by slot: views of the stacked tensors."""
        if self._stacked is None:
            return {}
        a_all, bt_all, layout = self._stacked
        return {slot: (a_all[lo:hi], bt_all[lo:hi].t()) for slot, (lo, hi) in layout.spans.items()}

    def _restack(self, parts: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """parts: (slot, A [r, in], B^T [r, out]) of every adapter this projection keeps."""
        self._stacked = None  # the old stack is freed before the new one is built
        if parts:
            a_all = torch.cat([a for _, a, _ in parts])
            bt_all = torch.cat([bt for _, _, bt in parts]).contiguous()
            layout = self._layers.layout(tuple((slot, a.shape[0]) for slot, a, _ in parts), a_all.device)
            self._stacked = (a_all, bt_all, layout)

    def add(self, slot: int, pair: Pair) -> None:
        a, b = pair
        self._restack([(s, a_, b_.t()) for s, (a_, b_) in self.pairs.items()] + [(slot, a, b.t())])

    def remove(self, slot: int) -> None:
        if slot in self.pairs:
            self._restack([(s, a, b.t()) for s, (a, b) in self.pairs.items() if s != slot])

    def _groups(self) -> Iterator[tuple[Pair, torch.Tensor | None]]:
        batch, pairs = self._layers.batch, self.pairs
        if batch is None or not pairs:
            return
        for slot, rows in batch.groups:
            pair = pairs.get(slot)
            if pair is not None:
                yield pair, rows

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, norm: tuple[RMSNorm, torch.Tensor] | None = None,
                  silu_gate: bool = False) -> None:
        """y [..., out] += this step's adapters' low-rank outputs for input x [..., in], in place. `norm` (the
        module and its effective weight): x is normed first; `silu_gate`: x is [gate | up] and the input is
        silu(gate) * up. The native kernel folds either in; the torch paths compute it."""
        batch = self._layers.batch
        if batch is None or self._stacked is None:
            return
        y2 = y.view(-1, self.out_features)
        a_all, bt_all, layout = self._stacked
        ranges = batch.ranges(layout)
        if ranges is None or lora_delta(x.reshape(-1, x.shape[-1]), y2, a_all, bt_all, ranges,
                                        None if norm is None else (norm[1], norm[0].eps), silu_gate):
            return
        if norm is not None:
            x = norm[0](x)
        if silu_gate:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        x2 = x.reshape(-1, self.in_features)
        if batch.row_slots is not None and a_all.shape[0] <= MAX_STACKED_RANK:
            h = F.linear(x2.to(a_all.dtype), a_all).mul_(batch.mask(layout, a_all.dtype))
            y2.add_(torch.mm(h, bt_all).to(y2.dtype))
            return
        for (a, b), rows in self._groups():
            if rows is None:
                y2.add_(F.linear(F.linear(x2.to(a.dtype), a), b).to(y2.dtype))
            else:
                delta = F.linear(F.linear(x2.index_select(0, rows).to(a.dtype), a), b)
                y2.index_add_(0, rows, delta.to(y2.dtype))

    @property
    def active(self) -> bool:
        """Whether a row of this step uses an adapter loaded into this projection."""
        batch = self._layers.batch
        return batch is not None and self._stacked is not None and batch.ranges(self._stacked[2]) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        self.add_delta(x, y)
        return y

    def silu_gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The base's fused silu(gate) * up product (ember.quant.linear), plus the low-rank path on that product."""
        y = self.base.silu_gated(gate_up)
        self.add_delta(gate_up, y, silu_gate=True)
        return y


class LoraFused(nn.Module):
    """A fused q/k/v or gate/up call (ember.quant.linear.FusedLinear) plus each part's low-rank path. `norm`: the
    RMSNorm the fused kernel applies itself, which the low-rank path applies to its own input."""

    def __init__(self, fused: nn.Module, parts: list[LoraLinear], norm: RMSNorm | None):
        super().__init__()
        self.fused = fused
        self.sizes = fused.sizes
        self._parts = parts  # registered where they are
        self._norm = None if norm is None else (norm, norm.effective_weight().contiguous())

    def _add(self, x: torch.Tensor, outs) -> None:
        if any(part.active for part in self._parts):
            for part, out in zip(self._parts, outs, strict=True):
                part.add_delta(x, out, self._norm)

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
