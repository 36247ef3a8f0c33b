"""Device and dtype choice shared by every loader."""

from __future__ import annotations

import torch

from ember.errors import ModelLoadError
from ember.loader.dtypes import resolve_dtype_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    name = str(device or "auto")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device cuda requested but no CUDA GPU is available to PyTorch")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device mps requested but Apple MPS is not available")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"unknown device {name!r} (use auto, cpu, cuda or mps)")
    return torch.device(name)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """A torch dtype as it is; a name by ember.loader.dtypes (auto = float32 on CPU, the checkpoint's on a GPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return DTYPES[resolve_dtype_name(dtype, device.type, checkpoint_dtype)]
