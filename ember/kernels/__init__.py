"""Native CPU kernels (C, built once per ISA, called through ctypes); see ember.kernels.native."""

from ember.kernels.matmul import NATIVE_TYPES, NativeMatmul, available
from ember.kernels.native import enabled, isa, library

__all__ = ["NATIVE_TYPES", "NativeMatmul", "available", "enabled", "isa", "library"]
