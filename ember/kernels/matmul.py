"""Matrix products on weights in their GGUF layout through the native library (see ggml_matmul.c)."""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

import ember
from ember.formats.ggml_types import BLOCK_SIZES, GGMLType
from ember.kernels.native import NATIVE_TYPES, library

MAX_SEGMENTS = 8  # ggml_matmul.c's MAX_SEGMENTS
PREP_NONE, PREP_RMS_NORM, PREP_SILU_GATE = 0, 1, 2  # ggml_matmul.c's PREP_*
logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _warn_spinning_openmp() -> None:
    if not ember.OMP_PASSIVE and torch.get_num_threads() > 1:
        logger.warning("torch was imported before ember without OMP_WAIT_POLICY=PASSIVE: its threads spin "
                       "between ops on the cores the native kernels use; import ember first or set it")


def available(ggml_type: GGMLType, in_features: int) -> bool:
    """Whether a [*, in_features] weight of this type can run natively on this machine's CPU."""
    return (ggml_type in NATIVE_TYPES and in_features % BLOCK_SIZES[ggml_type][0] == 0
            and library() is not None)


class NativeMatmul:
    """x [B, K] -> float32 [B, sum of rows]: one call for several weights of the same K (fused projections).

    The activations are quantized (for the quantized types) once per call, not once per weight. Each weight is
    a uint8 tensor [rows, row_bytes] in the file's layout, kept alive here since the library reads its address.
    """

    def __init__(self, weights: list[tuple[torch.Tensor, GGMLType]], in_features: int):
        if not 1 <= len(weights) <= MAX_SEGMENTS:
            raise ValueError(f"1 to {MAX_SEGMENTS} weights per call, not {len(weights)}")
        self.lib = library()
        if self.lib is None:
            raise RuntimeError("native kernels are unavailable")
        _warn_spinning_openmp()
        self.in_features = in_features
        self._weights = [w.contiguous() for w, _ in weights]
        n = len(weights)
        self._n = n
        self._ptrs = (ctypes.c_void_p * n)(*(w.data_ptr() for w in self._weights))
        self._types = (ctypes.c_int * n)(*(int(t) for _, t in weights))
        self._rows = (ctypes.c_int64 * n)(*(w.shape[0] for w in self._weights))
        self._row_bytes = (ctypes.c_int64 * n)(*(w.shape[1] for w in self._weights))
        self.out_features = sum(w.shape[0] for w in self._weights)

    @property
    def segments(self) -> list[tuple[int, int, int, int]]:
        """(address, GGML type, rows, row bytes) of each weight, in output order: for callers that run this
        product inside a larger native call (ember.kernels.decode_layers)."""
        return [(self._ptrs[i], self._types[i], self._rows[i], self._row_bytes[i]) for i in range(self._n)]

    def __call__(self, x: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None,
                 silu_gate: bool = False) -> torch.Tensor:
        """x [B, K] (any float dtype) -> float32 [B, out_features], with, applied to x first inside the call (in
        float32): `norm` = (weight [K], eps) an RMSNorm, x * rsqrt(mean(x^2) + eps) * weight; or `silu_gate`:
        x is [B, 2K] = [gate | up] and the product is taken of silu(gate) * up."""
        x = x.to(torch.float32).contiguous()
        batch = x.shape[0]
        if x.shape[1] != self.in_features * (2 if silu_gate else 1):
            raise ValueError(f"x has {x.shape[1]} columns for a {self.in_features}-wide weight")
        y = torch.empty(batch, self.out_features, dtype=torch.float32)
        if batch:
            weight, eps = norm if norm is not None else (None, 0.0)
            prep = PREP_SILU_GATE if silu_gate else PREP_RMS_NORM if norm is not None else PREP_NONE
            rc = self.lib.ember_matmul(x.data_ptr(), batch, self.in_features, self._n, self._ptrs, self._types,
                                       self._rows, self._row_bytes, y.data_ptr(), self.out_features, prep,
                                       None if weight is None else weight.data_ptr(), eps, torch.get_num_threads())
            if rc:
                raise RuntimeError(f"native matmul refused its arguments (K={self.in_features})")
        return y
