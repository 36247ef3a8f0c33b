"""From an encoder's per-token hidden states to one vector per input: pooling, L2 normalisation and
Matryoshka truncation, with sentence-transformers' definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool(hidden: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """hidden [B, L, H], mask [B, L] (True: a real token; padding on the right) -> [B, H] in float32."""
    hidden = hidden.float()
    if kind == "cls":
        return hidden[:, 0]
    if kind == "last":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if kind == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    raise ValueError(f"unknown pooling {kind!r}")


def finish_embeddings(vectors: torch.Tensor, normalize: bool, dimensions: int | None) -> torch.Tensor:
    """L2-normalise when the model does (its Normalize module); `dimensions` keeps the first that many
    components and renormalises them, as OpenAI's and Ollama's shortened embeddings are unit vectors."""
    if normalize:
        vectors = F.normalize(vectors, p=2, dim=-1)
    if dimensions is not None:
        vectors = F.normalize(vectors[:, :dimensions], p=2, dim=-1)
    return vectors
