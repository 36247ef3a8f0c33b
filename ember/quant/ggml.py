"""GGML tensor types, their block layouts, and vectorized dequantization in torch.

Each quantized type stores a row as whole blocks of `BLOCK_SIZES[t][0]` values in `BLOCK_SIZES[t][1]` bytes.
`dequantize` views the bytes as [n_blocks, block_bytes], slices the fields and unpacks them with bit ops on
uint8 tensors; there is no Python loop over blocks, so it runs on any device torch supports.

The results are bit-exact to `gguf.quants.dequantize` (the reference in the tests): fp16 scales are widened to
float32 and combined in the same order as gguf does it (e.g. Q4_K is `(d * sc) * q - (dmin * m)`, Q4_1 is
`d * q + m`), since float32 rounding makes `d * (q - 8)` and `d * q - 8 * d` differ.
"""

from __future__ import annotations

import numpy as np
import torch

from ember.errors import GGUFError
from ember.formats.ggml_types import (  # noqa: F401  (re-exported: the torch-free part lives in ember.formats.ggml_types)
    BLOCK_SIZES,
    FLOAT_TYPES,
    FP16_FIELDS,
    IQ4_NL_VALUES,
    QK_K,
    SUPPORTED,
    GGMLType,
    _ggml_type,
    row_bytes,
)

# --- field helpers -------------------------------------------------------------------------------------------

def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at `offset` of every block, as float32 [n, 1]."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes -> [..., 2, k]: the low nibbles, then the high nibbles."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _shifts(x: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """[..., k] bytes -> [..., len(shifts), k]: (x >> s) & mask for each shift s."""
    s = torch.tensor(shifts, dtype=torch.uint8, device=x.device).view(len(shifts), 1)
    return (x.unsqueeze(-2) >> s) & mask


def _bits_le(x: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes of a little-endian bit field -> [n, 8k] bits (bit i of the field at index i)."""
    s = torch.arange(8, dtype=torch.uint8, device=x.device)
    return ((x.unsqueeze(-1) >> s) & 1).flatten(-2)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins -> two uint8 [n, 8]."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc, mn


# --- per-type block decoders ---------------------------------------------------------------------------------
# Each takes uint8 [n, block_bytes] and returns (q, scale, offset): q integer-valued [n, groups, group] (int8 or
# uint8), scale float32 [n, groups, 1] and offset float32 [n, groups, 1] or None, such that gguf computes the
# values as scale * q (+ offset) in float32 -- so `decode` followed by that formula is bit-exact.

Decoded = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def _q4_0(b: torch.Tensor) -> Decoded:
    q = _nibbles(b[:, 2:]).view(-1, 1, 32).to(torch.int8) - 8
    return q, _f16(b, 0).view(-1, 1, 1), None


def _q4_1(b: torch.Tensor) -> Decoded:
    q = _nibbles(b[:, 4:]).view(-1, 1, 32)
    return q, _f16(b, 0).view(-1, 1, 1), _f16(b, 2).view(-1, 1, 1)


def _q5_0(b: torch.Tensor) -> Decoded:
    q = _nibbles(b[:, 6:]).flatten(1) | (_bits_le(b[:, 2:6]) << 4)
    return q.view(-1, 1, 32).to(torch.int8) - 16, _f16(b, 0).view(-1, 1, 1), None


def _q5_1(b: torch.Tensor) -> Decoded:
    q = _nibbles(b[:, 8:]).flatten(1) | (_bits_le(b[:, 4:8]) << 4)
    return q.view(-1, 1, 32), _f16(b, 0).view(-1, 1, 1), _f16(b, 2).view(-1, 1, 1)


def _q8_0(b: torch.Tensor) -> Decoded:
    q = b[:, 2:].contiguous().view(torch.int8)
    return q.view(-1, 1, 32), _f16(b, 0).view(-1, 1, 1), None


def _q2_k(b: torch.Tensor) -> Decoded:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    q = _shifts(qs.reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16)
    return q, dl, -ml


def _q3_k(b: torch.Tensor) -> Decoded:
    n = b.shape[0]
    hmask, qs, sc = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = _nibbles(sc[:, :8]).reshape(n, 16)
    high = _shifts(sc[:, 8:12], (0, 2, 4, 6), 3).reshape(n, 16)
    scales = (low | (high << 4)).to(torch.float32) - 32
    dl = (d * scales).view(n, 16, 1)
    ql = _shifts(qs.reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16)
    qh = _shifts(hmask, tuple(range(8)), 1).reshape(n, 16, 16)
    q = ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)
    return q, dl, None


def _k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: fp16 d and dmin at bytes 0-3 times eight 6-bit (scale, min) pairs: [n, 8, 1] each."""
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    return (d * sc.to(torch.float32)).view(n, 8, 1), (dmin * mn.to(torch.float32)).view(n, 8, 1)


def _q4_k(b: torch.Tensor) -> Decoded:
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32)
    return q, dl, -ml


def _q5_k(b: torch.Tensor) -> Decoded:
    n = b.shape[0]
    dl, ml = _k4_scales(b)
    qh = _shifts(b[:, 16:48], tuple(range(8)), 1)  # [n, 8, 32]
    ql = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    return ql | (qh << 4), dl, -ml


def _q6_k(b: torch.Tensor) -> Decoded:
    n = b.shape[0]
    ql, qh, sc = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16(b, 208)
    dl = (d * sc.contiguous().view(torch.int8).to(torch.float32)).view(n, 16, 1)
    low = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    high = _shifts(qh.reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return q.view(n, 16, 16), dl, None


def _kvalues(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4_NL_VALUES, dtype=torch.int8, device=device)


def _iq4_nl(b: torch.Tensor) -> Decoded:
    q = _kvalues(b.device)[_nibbles(b[:, 2:]).flatten(1).long()]
    return q.view(-1, 1, 32), _f16(b, 0).view(-1, 1, 1), None


def _iq4_xs(b: torch.Tensor) -> Decoded:
    n = b.shape[0]
    d = _f16(b, 0)
    scales_h = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF  # [n, 1]
    sh = (scales_h >> torch.arange(0, 16, 2, dtype=torch.int32, device=b.device)) & 3  # [n, 8]
    sl = _nibbles(b[:, 4:8]).transpose(1, 2).reshape(n, 8)  # byte i -> scales 2i (low), 2i+1 (high)
    scales = (sl.to(torch.int32) | (sh << 4)).to(torch.float32) - 32
    dl = (d * scales).view(n, 8, 1)
    q = _kvalues(b.device)[_nibbles(b[:, 8:].reshape(n, 8, 16)).reshape(n, 8, 32).long()]
    return q, dl, None


_DECODERS = {
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q2_K: _q2_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
    GGMLType.IQ4_NL: _iq4_nl,
    GGMLType.IQ4_XS: _iq4_xs,
}


def decode_blocks(blocks: torch.Tensor, ggml_type) -> Decoded:
    """uint8 [n_blocks, block_bytes] of a block type -> (q, scale, offset) as described above."""
    return _DECODERS[_ggml_type(ggml_type)](blocks)


def apply_scales(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """scale * q (+ offset) in float32, in gguf's order of operations."""
    out = scale * q.to(torch.float32)
    return out if offset is None else out + offset


def dequantize_blocks(blocks: torch.Tensor, ggml_type) -> torch.Tensor:
    """uint8 [n_blocks, block_bytes] of a block-quantized type -> float32 [n_blocks, block_values]."""
    return apply_scales(*decode_blocks(blocks, ggml_type)).view(blocks.shape[0], -1)


def dequantize(raw: torch.Tensor, ggml_type, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw uint8 bytes of a tensor (any shape) -> float32 tensor of `shape`."""
    t = _ggml_type(ggml_type)
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    block, size = BLOCK_SIZES[t]
    if raw.dtype != torch.uint8:
        raise GGUFError(f"raw tensor bytes must be uint8, got {raw.dtype}")
    if numel % block or raw.numel() != numel // block * size:
        raise GGUFError(f"{t.name} tensor of shape {shape} needs {numel // block * size} bytes, got {raw.numel()}")
    flat = raw.reshape(-1)
    if t == GGMLType.F32:
        out = flat.clone().view(torch.float32)  # a copy: raw may be a read-only mmap
    elif t == GGMLType.F16:
        out = flat.contiguous().view(torch.float16).to(torch.float32)
    elif t == GGMLType.BF16:
        out = flat.contiguous().view(torch.bfloat16).to(torch.float32)
    else:
        out = dequantize_blocks(flat.view(-1, size), t)
    return out.reshape(shape)


# --- random blocks (tests and benchmarks) --------------------------------------------------------------------

def random_blocks(ggml_type, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random payload bytes with finite random fp16 scales: uint8 [n_blocks, block_bytes]. Random bytes in the
    scale fields would give infs and NaNs, which no real file has."""
    t = _ggml_type(ggml_type)
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, BLOCK_SIZES[t][1]), dtype=np.uint8)
    for off in FP16_FIELDS[t]:
        blocks[:, off:off + 2] = (rng.standard_normal((n_blocks, 1)) * 0.01).astype(np.float16).view(np.uint8)
    return blocks


def random_rows(ggml_type, out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """A random weight in the layout QuantLinear takes: uint8 [out_features, bytes_per_row]."""
    t = _ggml_type(ggml_type)
    blocks = random_blocks(t, out_features * in_features // BLOCK_SIZES[t][0], seed)
    return torch.from_numpy(blocks.reshape(out_features, row_bytes(t, in_features)))
