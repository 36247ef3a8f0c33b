"""An embedding table kept in its GGML block format; only the rows looked up are dequantized (on a CPU with the
native kernels, by ember_get_rows in ggml_matmul.c: the same values as ember.quant.ggml.dequantize, without
the ~20 small torch ops a K-quant row takes there)."""

from __future__ import annotations

import torch
from torch import nn

from ember.kernels.native import NATIVE_TYPES, library
from ember.quant.ggml import FLOAT_TYPES, GGMLType, dequantize


class QuantEmbedding(nn.Module):
    def __init__(self, rows: torch.Tensor, ggml_type: GGMLType, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.num_embeddings, self.embedding_dim = shape
        self.ggml_type = ggml_type
        self.dtype = dtype
        self.register_buffer("rows", rows.to(device), persistent=False)  # [vocab, bytes per row]
        self._lib = (library() if self.rows.device.type == "cpu" and ggml_type in NATIVE_TYPES
                     and ggml_type not in FLOAT_TYPES and self.rows.is_contiguous() else None)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self._lib is not None and token_ids.numel():
            ids = token_ids.reshape(-1).to(torch.int64).contiguous()
            # out-of-range ids take the torch path, which raises IndexError (the C lookup would read past the table)
            if int(ids.min()) >= 0 and int(ids.max()) < self.num_embeddings:
                out = torch.empty(ids.numel(), self.embedding_dim)
                if not self._lib.ember_get_rows(self.rows.data_ptr(), int(self.ggml_type), self.rows.shape[1],
                                                self.embedding_dim, ids.data_ptr(), ids.numel(), out.data_ptr()):
                    return out.to(self.dtype)
        picked = self.rows[token_ids]
        return dequantize(picked, self.ggml_type, (token_ids.numel(), self.embedding_dim)).to(self.dtype)
