"""Native CPU kernels (C, compiled on first use, called through ctypes); see ember.kernels.native."""

from ember.kernels.native import MAX_BATCH, enabled, int8_group_matmul, library

__all__ = ["MAX_BATCH", "enabled", "int8_group_matmul", "library"]
