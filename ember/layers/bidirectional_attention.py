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

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None,
                rotary: tuple[RotaryEmbedding, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: [B, L, hidden]; key_mask: [B, 1, 1, L] (True: a real token), None when nothing is padded;
        rotary: the rotary module with prepare()'s [L, 1, dim] cos/sin, for rotary models."""
        batch, length, _ = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        if rotary is not None:
            module, cos, sin = rotary
            q, k = module.apply(q, cos, sin), module.apply(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=key_mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
