"""LoRA's low-rank path for rows of mixed adapters through the native library (see lora.c)."""

from __future__ import annotations

import torch

from ember.kernels.native import library

WEIGHT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # what lora.c reads A and B in (its `bf16` flag)
PREP_NONE, PREP_RMS_NORM, PREP_SILU_GATE = 0, 1, 2  # lora.c's LORA_PREP_*


def lora_delta(x: torch.Tensor, y: torch.Tensor, a_all: torch.Tensor, bt_all: torch.Tensor,
               ranges: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None, silu_gate: bool = False) -> bool:
    """y [rows, out] += (x[t] A_t^T) B_t^T for each row t, in place, where A_t = a_all[lo:hi], B_t^T = bt_all[lo:hi]
    and (lo, hi) = ranges[:, t] (int32 [2, rows]; lo == hi: no adapter). x [rows, in] float32, y float32 with unit
    column stride (a view into a wider output is fine), a_all [cols, in] and bt_all [cols, out] (B transposed)
    float32 or bfloat16. `norm` (float32 weight [in], eps): x is RMS-normed first; `silu_gate`: x rows are
    [gate | up] (2 * in wide) and the input is silu(gate) * up. False where the kernel does not apply (the caller
    keeps its torch path)."""
    lib = library()
    if (lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or y.dtype != torch.float32
            or a_all.dtype not in WEIGHT_DTYPES or bt_all.dtype != a_all.dtype
            or x.stride(1) != 1 or y.stride(1) != 1 or not a_all.is_contiguous() or not bt_all.is_contiguous()
            or ranges.dtype != torch.int32 or not ranges.is_contiguous()
            or x.shape[1] != a_all.shape[1] * (2 if silu_gate else 1) or y.shape[1] != bt_all.shape[1]
            or (norm is not None and (silu_gate or norm[0].dtype != torch.float32 or not norm[0].is_contiguous()))):
        return False
    rows, (cols, width) = x.shape[0], a_all.shape
    h = torch.empty(rows, cols)
    prep = PREP_SILU_GATE if silu_gate else PREP_NONE if norm is None else PREP_RMS_NORM
    xe = torch.empty(rows, width) if prep != PREP_NONE else None
    rc = lib.ember_lora(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), rows, width, y.shape[1],
                        a_all.data_ptr(), bt_all.data_ptr(), cols, WEIGHT_DTYPES[a_all.dtype],
                        ranges[0].data_ptr(), ranges[1].data_ptr(), h.data_ptr(),
                        None if xe is None else xe.data_ptr(), prep, None if norm is None else norm[0].data_ptr(),
                        0.0 if norm is None else norm[1], torch.get_num_threads())
    return rc == 0
