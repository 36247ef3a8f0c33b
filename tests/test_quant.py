"""GGML dequantization (bit-exact vs gguf.quants) and QuantLinear (vs a float32 reference matmul)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ember.errors import GGUFError
from ember.quant.ggml import BLOCK_SIZES, SUPPORTED, GGMLType, dequantize, row_bytes

BLOCK_TYPES = sorted(t for t in SUPPORTED if BLOCK_SIZES[t][0] > 1)

# Byte offsets of the fp16 scale fields in each block type.
F16_FIELDS = {
    GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,), GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,), GGMLType.IQ4_NL: (0,), GGMLType.IQ4_XS: (0,),
}


def random_blocks(t: GGMLType, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random payload bytes with finite random fp16 scales: uint8 [n_blocks, block_bytes]."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, BLOCK_SIZES[t][1]), dtype=np.uint8)
    for off in F16_FIELDS[t]:
        blocks[:, off:off + 2] = (rng.standard_normal((n_blocks, 1)) * 0.01).astype(np.float16).view(np.uint8)
    return blocks


def reference(raw: np.ndarray, t: GGMLType) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(t)))))


def random_weight(t: GGMLType, out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """uint8 [out_features, bytes_per_row] of random blocks."""
    block = BLOCK_SIZES[t][0]
    raw = random_blocks(t, out_features * in_features // block, seed)
    return torch.from_numpy(raw.reshape(out_features, row_bytes(t, in_features)))


# --- part 1: dequantize --------------------------------------------------------------------------------------

def test_type_ids_match_gguf():
    for t in GGMLType:
        assert gguf.GGMLQuantizationType[t.name].value == t.value
    for t in SUPPORTED:
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(t))] == BLOCK_SIZES[t]


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_bit_exact(t):
    raw = random_blocks(t, 97, seed=int(t))
    ref = reference(raw, t)
    block = BLOCK_SIZES[t][0]
    out = dequantize(torch.from_numpy(raw), t, (97, block))
    assert out.dtype == torch.float32 and out.shape == (97, block)
    assert torch.equal(out, ref)
    # the same bytes as [rows, bytes_per_row] and as 1-D
    out2 = dequantize(torch.from_numpy(raw.reshape(-1)), t, (97 * block,))
    assert torch.equal(out2, ref.reshape(-1))


@pytest.mark.parametrize("t", [GGMLType.F32, GGMLType.F16, GGMLType.BF16], ids=lambda t: t.name)
def test_dequantize_float_types(t):
    x = torch.randn(6, 40) * 3
    dt = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}[t]
    raw = x.to(dt).view(torch.uint8)
    out = dequantize(raw, t, (6, 40))
    assert out.dtype == torch.float32
    assert torch.equal(out, x.to(dt).float())
    ref = reference(raw.numpy().reshape(-1), t).reshape(6, 40)
    assert torch.equal(out, ref.float())


def test_dequantize_f32_does_not_alias_raw():
    raw = torch.randn(8).view(torch.uint8)
    out = dequantize(raw, GGMLType.F32, (8,))
    out.zero_()
    assert raw.view(torch.float32).abs().sum() > 0


def test_unsupported_and_bad_sizes():
    with pytest.raises(GGUFError, match="tensor type IQ2_XXS is not supported"):
        dequantize(torch.zeros(66, dtype=torch.uint8), GGMLType.IQ2_XXS, (256,))
    with pytest.raises(GGUFError, match="not supported"):
        dequantize(torch.zeros(66, dtype=torch.uint8), 99, (256,))
    with pytest.raises(GGUFError):
        dequantize(torch.zeros(17, dtype=torch.uint8), GGMLType.Q4_0, (32,))
    assert row_bytes(GGMLType.Q4_K, 512) == 288
    assert row_bytes(GGMLType.F16, 10) == 20
    with pytest.raises(GGUFError):
        row_bytes(GGMLType.Q8_0, 33)


@pytest.mark.parametrize("name", ["Q4_K_M", "Q6_K", "Q8_0", "Q4_0", "bf16"])
def test_dequantize_real_tensors_bit_exact(testdata, name):
    reader = gguf.GGUFReader(testdata / "gguf" / f"tiny-llama-{name}.gguf")
    seen = set()
    for info in reader.tensors:
        t = GGMLType(int(info.tensor_type))
        shape = tuple(int(s) for s in reversed(info.shape))
        ref = reference(info.data, t).reshape(shape)
        raw = torch.from_numpy(np.array(info.data).reshape(-1).view(np.uint8))
        out = dequantize(raw, t, shape)
        assert torch.equal(out, ref.float()), info.name
        seen.add(t)
    assert len(seen) >= 2
