"""Grammar masks on logits: one xgrammar bitmask row per constrained sequence, filled from its matcher and
applied in place (forbidden tokens to -inf). The sampler calls this only when a row has a constraint, so
xgrammar is not loaded for free generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import xgrammar as xgr


class Constraint(Protocol):
    """What the sampler needs from a sequence's grammar state (ember.engine.structured.GrammarState)."""

    @property
    def active(self) -> bool: ...

    def fill(self, bitmask: torch.Tensor, row: int) -> None: ...


@dataclass
class GrammarMasks:
    """Filled bitmask rows for a batch; `rows` are the constrained ones (the other rows stay unmasked)."""

    bitmask: torch.Tensor  # [batch, ceil(vocab / 32)] int32, on the CPU
    rows: list[int]

    def apply(self, logits: torch.Tensor) -> None:
        """Set the logits the grammars forbid to -inf, in place, on the constrained rows only."""
        xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device, non_blocking=True), indices=self.rows)

    def select(self, rows: list[int]) -> GrammarMasks:
        """The masks of a subset of the batch's rows, renumbered 0..len(rows)-1."""
        kept = [i for i, row in enumerate(rows) if row in self.rows]
        return GrammarMasks(self.bitmask[rows], kept)


def fill_masks(constraints: list[Constraint | None], vocab_size: int) -> GrammarMasks | None:
    """One bitmask row per sequence, filled for the rows whose constraint is active; None if none is."""
    rows = [row for row, constraint in enumerate(constraints) if constraint is not None and constraint.active]
    if not rows:
        return None
    bitmask = xgr.allocate_token_bitmask(len(constraints), vocab_size)
    for row in rows:
        constraints[row].fill(bitmask, row)
    return GrammarMasks(bitmask, rows)
