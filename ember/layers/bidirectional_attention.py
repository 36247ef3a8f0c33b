"""Encoder self-attention: every token attends to every real token of its own input (no causal mask, no KV
cache), over a batch of inputs padded on the right to one length.

Only attention needs the padded [B, L] layout; every other layer of an encoder works token by token, so the
model keeps the real tokens packed ([T, hidden], `PackedBatch`) and pads just around the attention product:
no work is spent on padding in the projections, norms and feed-forward blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.mlp import make_linear
from ember.layers.rotary import RotaryEmbedding


@dataclass
class PackedBatch:
    """Where the real tokens of a padded [B, L] batch are: `rows` indexes them in the flattened batch (None
    when nothing is padded, so packing is a free reshape); `key_mask` [B, 1, 1, L] for attention."""

    batch: int
    length: int
    rows: torch.Tensor | None
    key_mask: torch.Tensor | None

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> PackedBatch:
        if bool(mask.all()):
            return cls(mask.shape[0], mask.shape[1], None, None)
        return cls(mask.shape[0], mask.shape[1], mask.flatten().nonzero().squeeze(1), mask[:, None, None, :])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, D] -> [T, D], the real tokens only."""
        flat = x.reshape(self.batch * self.length, -1)
        return flat if self.rows is None else flat.index_select(0, self.rows)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, D] -> [B, L, D], zeros at the padding."""
        if self.rows is None:
            return x.view(self.batch, self.length, -1)
        out = x.new_zeros(self.batch * self.length, x.shape[-1])
        return out.index_copy_(0, self.rows, x).view(self.batch, self.length, -1)


class BidirectionalAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = make_linear(hidden_size, hidden_size, bias)
        self.k_proj = make_linear(hidden_size, hidden_size, bias)
        self.v_proj = make_linear(hidden_size, hidden_size, bias)
        self.o_proj = make_linear(hidden_size, hidden_size, bias)
        self.qkv_proj: nn.Linear | None = None  # q, k and v in one matmul, once loaded (fuse_projections)

    def fuse_projections(self) -> None:
        """Join the loaded q/k/v weights into one [3 * hidden, hidden] matrix: one GEMM instead of three."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in parts])
        bias = torch.cat([p.bias for p in parts]) if self.q_proj.bias is not None else None
        self.qkv_proj = make_linear(weight.shape[1], weight.shape[0], bias is not None)
        self.qkv_proj.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.qkv_proj.bias = nn.Parameter(bias, requires_grad=False)
        self.q_proj = self.k_proj = self.v_proj = None

    def forward(self, x: torch.Tensor, batch: PackedBatch,
                rotary: tuple[RotaryEmbedding, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: the packed real tokens [T, hidden]; rotary: the rotary module with prepare()'s [L, 1, dim] cos/sin,
        for rotary models. Returns [T, hidden]."""
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x)
        else:
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        shape = (batch.batch, batch.length, self.num_heads, self.head_dim)
        q, k, v = (part.reshape(shape) for part in batch.pad(qkv).chunk(3, dim=-1))
        if rotary is not None:
            module, cos, sin = rotary
            q, k = module.apply(q, cos, sin), module.apply(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=batch.key_mask)
        return self.o_proj(batch.pack(out.transpose(1, 2)))
