"""Device and dtype choice shared by every loader."""

from __future__ import annotations

import torch

from ember.errors import ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


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
    """auto = float32 on CPU: the native kernels take float32 activations whatever the weights' type, and a
    CPU without bf16 instructions only emulates bf16 arithmetic (5x slower prefill measured on AVX2); the
    checkpoint's own dtype on a GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPE_ALIASES.get(str(dtype or "auto"), str(dtype or "auto"))
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        checkpoint = DTYPE_ALIASES.get(str(checkpoint_dtype), str(checkpoint_dtype))
        return DTYPES.get(checkpoint, torch.float16)
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)")
    return DTYPES[name]
