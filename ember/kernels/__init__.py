"""Native CPU kernels (C, built once per ISA, called through ctypes).

ember.kernels.native builds and loads the library without importing torch (the memory estimator asks it what
ember will hold); ember.kernels.matmul wraps its calls for torch tensors.
"""
