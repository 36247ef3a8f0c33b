"""Feed-forward blocks: the gated one every decoder family (and nomic-bert) uses, and BERT's dense one."""

import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import ModelLoadError

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ModelLoadError(f"unsupported hidden_act {name!r} (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class _UninitializedLinear(nn.Linear):
    def reset_parameters(self) -> None:
        """Nothing: the checkpoint provides the weights (and init ops on meta import torch._dynamo: 2 s)."""


def make_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
    """A Linear without initialisation: weights are created on the meta device and loaded into place."""
    return _UninitializedLinear(in_features, out_features, bias=bias, device="meta")


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.gate_proj = make_linear(hidden_size, intermediate_size)
        self.up_proj = make_linear(hidden_size, intermediate_size)
        self.down_proj = make_linear(intermediate_size, hidden_size)
        self.gate_up_proj = None  # gate and up in one call, when the loader could fuse them (fuse_projections)
        # Set by fuse_projections where down_proj's kernel can form silu(gate) * up itself from the joined output.
        self.silu_in_down = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.silu_in_down:
            return self.down_proj.silu_gated(self.gate_up_proj.joined(x))
        gate, up = self.gate_up_proj(x) if self.gate_up_proj is not None else (self.gate_proj(x), self.up_proj(x))
        # The projection's output is a fresh tensor: activate and gate it in place (no extra [T, inter] buffers).
        hidden = F.silu(gate, inplace=True) if self.act is F.silu else self.act(gate)
        return self.down_proj(hidden.mul_(up))


class DenseMLP(nn.Module):
    """BERT's feed-forward block: up-projection, activation, down-projection, both with biases."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.up_proj = make_linear(hidden_size, intermediate_size, bias=True)
        self.down_proj = make_linear(intermediate_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))
