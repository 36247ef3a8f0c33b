"""RMSNorm in the two numerically distinct forms checkpoints were trained with."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32.

    `weight_offset=0` is Llama's form (cast back, then scale by weight); `weight_offset=1` is Gemma's
    (scale by 1 + weight in float32, then cast), which is why the two are not interchangeable.
    """

    def __init__(self, dim: int, eps: float, weight_offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.empty(dim, device="meta"))

    def effective_weight(self) -> torch.Tensor:
        """The float32 factor of the normed activations (weight_offset + weight): what a fused kernel applies."""
        return self.weight.float() + self.weight_offset if self.weight_offset else self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel for x * rsqrt(mean(x^2) + eps) in float32 (the same values as the op-by-op form).
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.weight_offset:
            return (h * (self.weight_offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias loaded from the checkpoint (no initialisation on the meta device)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device="meta"))
        self.bias = nn.Parameter(torch.empty(dim, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
