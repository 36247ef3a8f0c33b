"""A linear layer whose weight stays in a GGML block format.

Backends, picked per type and device in the constructor (`QuantLinear.backend`):

* ``native`` -- on a CPU with the native kernels (ember.kernels: AVX2 or AVX-512 VNNI, C through ctypes),
  every type of ``ember.kernels.native.NATIVE_TYPES`` (Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, and
  F16/BF16 matrices): the rows stay exactly as in the file (a zero-copy view of the map, never repacked), the
  activations are quantized to int8 once per call and multiplied with integer dot products. Output float32.
  `fuse_linears` joins projections that read the same input (q/k/v, gate/up) into one call.
* ``int4`` -- Q4_0, Q4_1, Q4_K elsewhere (CUDA; CPUs without the native kernels): 4-bit values q with one
  affine (scale, offset) per 32 consecutive values of a row, which is what PyTorch's int4 kernels compute:
  w = (q - 8) * scale + zero, group size 32 (Q4_0: scale = d, zero = 0; Q4_1: scale = d, zero = m + 8d;
  Q4_K: scale = d*sc, zero = 8*d*sc - dmin*m). Repacked once with ``_convert_weight_to_int4pack[_for_cpu]``
  and run with ``_weight_int4pack_mm[_for_cpu]``. Scale and zero are rounded to the activation dtype; that
  rounding is the only difference from dequantize().
* ``int8`` -- Q5_0, Q5_1, Q5_K, Q6_K, Q8_0 elsewhere: every GGML type is ``scale * q (+ offset)`` per group
  of 16 or 32 values (see ember.quant.ggml.decode_blocks); repacked once into int8 q [out, in] plus float32
  scale/offset per group. Forward dequantizes a chunk of rows at a time (bit-exact to dequantize() before the
  cast) and multiplies it; the chunk (256K values) stays in cache and the full weight is never kept.
* ``blocks`` -- every other type (Q2_K, Q3_K; IQ4 off the native path): the blocks are kept as they are and
  forward decodes them chunk by chunk the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.kernels import matmul as kernels
from ember.layers.norm import RMSNorm
from ember.quant.ggml import (
    BLOCK_SIZES,
    FLOAT_TYPES,
    GGMLType,
    _f16,
    _nibbles,
    _scale_min_k4,
    apply_scales,
    decode_blocks,
    dequantize,
    row_bytes,
)

INT4_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K)
INT8_TYPES = (GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q8_0)
GROUP = 32
# Values per dequantized chunk in the on-the-fly backends: a float32 chunk of 256K values (1 MiB) stays in a CPU
# cache; on GPUs, bigger chunks (64 MiB) keep the number of kernel launches down.
CHUNK_VALUES = {"cpu": 1 << 18, "cuda": 1 << 24}


def int4_params(rows: torch.Tensor, ggml_type: GGMLType, out_features: int, in_features: int):
    """Q4_0/Q4_1/Q4_K rows -> (q int32 [out, in] in 0..15, scale, zero float32 [out, in // 32])
    with weight = (q - 8) * scale + zero."""
    size = BLOCK_SIZES[ggml_type][1]
    b = rows.reshape(-1, size)
    if ggml_type == GGMLType.Q4_0:
        scale = _f16(b, 0)
        zero = torch.zeros_like(scale)
        q = _nibbles(b[:, 2:])
    elif ggml_type == GGMLType.Q4_1:
        scale, m = _f16(b, 0), _f16(b, 2)
        zero = m + 8 * scale
        q = _nibbles(b[:, 4:])
    elif ggml_type == GGMLType.Q4_K:
        n = b.shape[0]
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _scale_min_k4(b[:, 4:16])
        scale = d * sc.to(torch.float32)  # [n, 8]
        zero = 8 * scale - dmin * mn.to(torch.float32)
        q = _nibbles(b[:, 16:].reshape(n, 4, 32))
    else:
        raise ValueError(f"{ggml_type!r} is not a 4-bit affine type")
    groups = in_features // GROUP
    return (q.reshape(out_features, in_features).to(torch.int32),
            scale.reshape(out_features, groups), zero.reshape(out_features, groups))


def _int4_supported(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    if in_features % GROUP:
        return False
    if device.type == "cpu":
        return dtype in (torch.bfloat16, torch.float16, torch.float32) and out_features % 16 == 0
    if device.type == "cuda":
        return dtype == torch.bfloat16 and out_features % 8 == 0 and in_features % 64 == 0
    return False


class QuantLinear(nn.Module):
    def __init__(self, rows: torch.Tensor, ggml_type, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = (int(s) for s in shape)
        self.ggml_type = GGMLType(int(ggml_type))
        self.dtype = dtype
        expected = (self.out_features, row_bytes(self.ggml_type, self.in_features))
        if rows.dtype != torch.uint8 or rows.numel() != expected[0] * expected[1]:
            raise ValueError(f"{self.ggml_type.name} rows of {tuple(rows.shape)} {rows.dtype} do not hold {shape}")
        rows = rows.reshape(expected)
        self._block_bytes = BLOCK_SIZES[self.ggml_type][1]
        self._chunk_values = CHUNK_VALUES.get(device.type, CHUNK_VALUES["cuda"])
        self.bias: nn.Parameter | None = None
        if device.type == "cpu" and kernels.available(self.ggml_type, self.in_features):
            self.backend = "native"
            self.register_buffer("rows", rows, persistent=False)
            self.native = kernels.NativeMatmul([(rows, self.ggml_type)], self.in_features)
        elif self.ggml_type in INT4_TYPES and _int4_supported(device, dtype, self.out_features, self.in_features):
            self.backend = "int4"
            q, scale, zero = int4_params(rows, self.ggml_type, self.out_features, self.in_features)
            sz = torch.stack((scale.t(), zero.t()), dim=-1).to(dtype).contiguous()  # [in // 32, out, 2]
            if device.type == "cpu":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            else:
                q = q.to(device)
                q_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
                tiles = 8 if self.in_features % 256 == 0 else 4 if self.in_features % 128 == 0 else 2
                packed = torch.ops.aten._convert_weight_to_int4pack(q_u8, tiles)
            self.register_buffer("weight_packed", packed, persistent=False)
            self.register_buffer("scales_and_zeros", sz.to(device), persistent=False)
        elif self.ggml_type in INT8_TYPES:
            self.backend = "int8"
            qs, scales, offsets = [], [], []
            for r0, r1 in self._chunks():
                q, scale, offset = decode_blocks(rows[r0:r1].reshape(-1, self._block_bytes), self.ggml_type)
                qs.append(q.to(torch.int8).reshape(r1 - r0, -1))
                scales.append(scale.reshape(r1 - r0, -1))
                offsets.append(None if offset is None else offset.reshape(r1 - r0, -1))
            self.register_buffer("qs", torch.cat(qs).to(device), persistent=False)
            self.register_buffer("scales", torch.cat(scales).to(device), persistent=False)
            has_offset = offsets[0] is not None
            self.register_buffer("offsets", torch.cat(offsets).to(device) if has_offset else None, persistent=False)
        else:
            self.backend = "blocks"
            self.register_buffer("rows", rows.to(device), persistent=False)

    def _chunks(self):
        step = max(1, self._chunk_values // self.in_features)
        for r0 in range(0, self.out_features, step):
            yield r0, min(r0 + step, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"type={self.ggml_type.name}, backend={self.backend}, bias={self.bias is not None}")

    def _weight_chunk(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of the weight, dequantized to float32 [r1 - r0, in_features] (then cast by the caller)."""
        if self.backend == "int8":
            n = r1 - r0
            w = self.qs[r0:r1].to(torch.float32).view(n, self.scales.shape[1], -1)
            w.mul_(self.scales[r0:r1].unsqueeze(-1))  # in place: same rounding as apply_scales, less traffic
            if self.offsets is not None:
                w.add_(self.offsets[r0:r1].unsqueeze(-1))
            return w.view(n, self.in_features)
        q, scale, offset = decode_blocks(self.rows[r0:r1].reshape(-1, self._block_bytes), self.ggml_type)
        return apply_scales(q, scale, offset).view(r1 - r0, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The whole weight in float32 (for tests and debugging; forward never builds it)."""
        if self.backend == "native":
            return dequantize(self.rows, self.ggml_type, (self.out_features, self.in_features))
        if self.backend == "int4":
            raise NotImplementedError("the int4 backend keeps only the packed weight")
        return torch.cat([self._weight_chunk(r0, r1) for r0, r1 in self._chunks()])

    def silu_gated(self, gate_up: torch.Tensor) -> torch.Tensor:
        """This layer applied to silu(gate) * up, from gate_up = [..., 2 * in_features] = [gate | up]: the native
        kernel forms the product while preparing its input (native backend only)."""
        lead = gate_up.shape[:-1]
        y = self.native(gate_up.reshape(-1, 2 * self.in_features), silu_gate=True).to(self.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.backend == "native":
            y = self.native(x2).to(self.dtype)
        elif self.backend == "int4":
            x2 = x2.to(self.dtype).contiguous()
            if x2.device.type == "cpu":
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_packed, GROUP, self.scales_and_zeros)
            else:
                y = torch.ops.aten._weight_int4pack_mm(x2, self.weight_packed, GROUP, self.scales_and_zeros)
        else:
            x2 = x2.to(self.dtype)
            y = x2.new_empty(x2.shape[0], self.out_features)
            for r0, r1 in self._chunks():
                y[:, r0:r1] = F.linear(x2, self._weight_chunk(r0, r1).to(self.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)


class FusedLinear(nn.Module):
    """Native QuantLinears that read the same input (q/k/v, gate/up) run as one kernel call: the input is
    quantized once and the threads are started once. Returns one output per part. The parts keep their own
    modules (and weights); this one only calls the kernel over their rows. With `norm` (an RMSNorm of the
    float32 activations), the kernel normalizes its input itself, so the caller passes the un-normed x."""

    def __init__(self, parts: list[QuantLinear], norm: RMSNorm | None = None):
        super().__init__()
        self.folded_norm = None if norm is None else (norm.effective_weight().contiguous(), norm.eps)
        self.sizes = [p.out_features for p in parts]
        self.dtype = parts[0].dtype
        self.native = kernels.NativeMatmul([(p.rows, p.ggml_type) for p in parts], parts[0].in_features)
        self.parts = parts  # a plain list: the parts stay registered where they are

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The parts' outputs side by side, [..., sum of out_features], before their biases."""
        y = self.native(x.reshape(-1, self.native.in_features), self.folded_norm).to(self.dtype)
        return y.reshape(*x.shape[:-1], -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.joined(x).split(self.sizes, dim=-1)
        return tuple(o if p.bias is None else o + p.bias.to(o.dtype) for o, p in zip(outs, self.parts, strict=True))


def fuse_linears(parts: list[nn.Module], norm: RMSNorm | None = None) -> FusedLinear | None:
    """One FusedLinear for these projections (after `norm`, if given), or None where they cannot share a native
    call; the norm is folded in only for float32 activations, where it rounds as the separate module does."""
    if not all(isinstance(p, QuantLinear) and p.backend == "native" for p in parts):
        return None
    if len({(p.in_features, p.dtype) for p in parts}) != 1 or len(parts) > kernels.MAX_SEGMENTS:
        return None
    # One activation format per call: 32-value types and 256-value (K, IQ4_XS) types quantize x differently.
    if len({BLOCK_SIZES[p.ggml_type][0] for p in parts if p.ggml_type not in FLOAT_TYPES}) > 1:
        return None
    if norm is not None and parts[0].dtype != torch.float32:
        return None
    return FusedLinear(parts, norm)
