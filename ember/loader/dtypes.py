"""Activation dtypes by name, without torch: what "auto" means on each kind of device.

ember.loader.device maps the name to a torch dtype for the loaders; the memory estimator (ember.store.memory)
counts bytes with it without importing torch.
"""

from __future__ import annotations

from ember.errors import ModelLoadError

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
# "auto" per device kind; elsewhere the checkpoint's own dtype. float32 on CPU: the native kernels take float32
# activations whatever the weights' type, and a CPU without bf16 instructions only emulates bf16 arithmetic
# (5x slower prefill measured on AVX2).
AUTO_DTYPE = {"cpu": "float32"}


def resolve_dtype_name(dtype, device_kind: str, checkpoint: str | None) -> str:
    """float32, bfloat16 or float16 for `dtype` (a name, an alias or auto) on a device of `device_kind`
    (cpu, cuda or mps); auto off CPU is `checkpoint`'s dtype, float16 when that is unknown."""
    name = str(dtype or "auto").removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name == "auto":
        if device_kind in AUTO_DTYPE:
            return AUTO_DTYPE[device_kind]
        checkpoint = DTYPE_ALIASES.get(str(checkpoint), str(checkpoint))
        return checkpoint if checkpoint in DTYPE_BYTES else "float16"
    if name not in DTYPE_BYTES:
        raise ModelLoadError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)")
    return name


def resolve_lora_dtype_name(lora_dtype, activation: str, device_kind: str) -> str:
    """The dtype LoRA adapters are held in (EngineArgs.lora_dtype): a name or alias, or "auto" — bfloat16 for
    float32 activations on a CPU with native bf16 arithmetic (AVX512-BF16, the avx512 kernel build), whose
    matmuls then read half the bytes (the native LoRA kernel widens bf16 exactly; torch's bf16 matmuls are
    native there), else the activation dtype: on an AVX2-only CPU torch only emulates bf16 arithmetic."""
    name = str(lora_dtype or "auto").removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name != "auto":
        if name not in DTYPE_BYTES:
            raise ModelLoadError(f"unknown lora_dtype {lora_dtype!r} (use auto, float32, bfloat16 or float16)")
        return name
    if activation == "float32" and device_kind == "cpu":
        from ember.kernels import native  # torch-free

        if native.enabled() and native.bf16_dot(native.isa()):
            return "bfloat16"
    return activation
