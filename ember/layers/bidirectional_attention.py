"""Encoder self-attention: every token attends to every real token of its own input (no causal mask, no KV
cache). Inputs come as a padded batch [B, L, hidden]; `mask` [B, L] marks the real tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.mlp import make_linear
from ember.layers.rotary import RotaryEmbedding


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

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None,
                rotary: tuple[RotaryEmbedding, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: [B, L, hidden]; key_mask: [B, 1, 1, L] (True: a real token), None when nothing is padded;
        rotary: the rotary module with prepare()'s [L, 1, dim] cos/sin, for rotary models."""
        batch, length, _ = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        if self.qkv_proj is not None:
            q, k, v = (part.view(shape) for part in self.qkv_proj(x).chunk(3, dim=-1))
        else:
            q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        if rotary is not None:
            module, cos, sin = rotary
            q, k = module.apply(q, cos, sin), module.apply(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=key_mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
