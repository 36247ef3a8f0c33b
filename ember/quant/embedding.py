"""An embedding table kept in its GGML block format; only the rows looked up are dequantized."""

from __future__ import annotations

import torch
from torch import nn

from ember.quant.ggml import GGMLType, dequantize


class QuantEmbedding(nn.Module):
    def __init__(self, rows: torch.Tensor, ggml_type: GGMLType, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.num_embeddings, self.embedding_dim = shape
        self.ggml_type = ggml_type
        self.dtype = dtype
        self.register_buffer("rows", rows.to(device), persistent=False)  # [vocab, bytes per row]

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        picked = self.rows[token_ids]
        return dequantize(picked, self.ggml_type, (token_ids.numel(), self.embedding_dim)).to(self.dtype)
