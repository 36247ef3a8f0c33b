"""Putting loaded tensors into a meta-device model, with shape checks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ember.errors import ModelLoadError


def build_model(cls: Callable[..., nn.Module], config) -> nn.Module:
    """The model a config describes (weights on the meta device). Settings that pass the config's range checks
    can still be unusable together (yarn scaling of a negative rope theta, a zero factor): a ModelLoadError."""
    try:
        return cls(config)
    except (ValueError, ArithmeticError, TypeError, KeyError) as err:
        raise ModelLoadError(f"config: unusable model settings ({type(err).__name__}: {err})") from None


# Called while weights load with (bytes read so far, bytes in all): the CLI draws a progress bar from it.
Progress = Callable[[int, int], None]


def set_weight(model: nn.Module, name: str, param: torch.Tensor, tensor: torch.Tensor, dtype, device) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise ModelLoadError(f"tensor {name}: shape {tuple(tensor.shape)} does not match the config's {tuple(param.shape)}")
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, attr, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))


def finish_loading(model: nn.Module, device: torch.device) -> None:
    """Fail on any parameter the checkpoint did not provide; move non-parameter state to the device."""
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelLoadError(f"checkpoint is missing weights: {shown}")
    # A decoder's rotary module sits in model.model; nomic-bert's on the model itself; BERT has none.
    rotary = getattr(getattr(model, "model", model), "rotary", None)
    if rotary is None:
        model.eval()
        return
    rotary.inv_freq = rotary.inv_freq.to(device)
    if rotary.long_inv_freq is not None:
        rotary.long_inv_freq = rotary.long_inv_freq.to(device)
    model.eval()
