"""GGML dequantization (bit-exact vs gguf.quants) and QuantLinear's torch backends (vs a float32 reference matmul)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ember.errors import GGUFError
from ember.quant.ggml import (
    BLOCK_SIZES,
    SUPPORTED,
    GGMLType,
    dequantize,
    random_blocks,
    random_rows,
    row_bytes,
)
from ember.quant.linear import INT4_TYPES, INT8_TYPES, QuantLinear

BLOCK_TYPES = sorted(t for t in SUPPORTED if BLOCK_SIZES[t][0] > 1)


def reference(raw: np.ndarray, t: GGMLType) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(t)))))


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


# --- part 2: QuantLinear's torch backends (the native CPU backend: tests/test_kernels.py) ---------------------

@pytest.fixture(autouse=True)
def _torch_backends(monkeypatch):
    """These tests cover the backends CUDA and CPUs without the native kernels use."""
    monkeypatch.setenv("EMBER_NATIVE_KERNELS", "0")


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [1, 7])
def test_quant_linear_matches_dequantized_matmul(t, batch):
    out_f, in_f = 48, 512
    rows = random_rows(t, out_f, in_f, seed=int(t) + batch)
    snapshot = rows.clone()
    layer = QuantLinear(rows, t, (out_f, in_f), torch.bfloat16, torch.device("cpu"))
    assert torch.equal(rows, snapshot)  # never writes into the (read-only mmap) rows
    w = dequantize(rows, t, (out_f, in_f))
    expected = "int4" if t in INT4_TYPES else "int8" if t in INT8_TYPES else "blocks"
    assert layer.backend == expected
    if layer.backend != "int4":
        assert torch.equal(layer.dequantized_weight(), w)
    x = torch.randn(batch, in_f)
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (batch, out_f)
    assert _rel_err(y, x @ w.T) < TOL[torch.bfloat16]
    assert t.name in repr(layer) and f"in_features={in_f}" in repr(layer)


@pytest.mark.parametrize("t", INT4_TYPES + (GGMLType.Q8_0, GGMLType.Q6_K, GGMLType.Q3_K), ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_quant_linear_other_dtypes(t, dtype):
    out_f, in_f = 32, 256
    rows = random_rows(t, out_f, in_f, seed=3)
    layer = QuantLinear(rows, t, (out_f, in_f), dtype, torch.device("cpu"))
    x = torch.randn(5, in_f)
    y = layer(x)
    assert y.dtype == dtype
    tol = 1e-2 if (dtype == torch.float16 and layer.backend == "int4") else TOL[dtype]
    assert _rel_err(y, x @ dequantize(rows, t, (out_f, in_f)).T) < tol


@pytest.mark.parametrize("t", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.IQ4_XS], ids=lambda t: t.name)
def test_quant_linear_bias_and_3d_input(t):
    out_f, in_f = 64, 256
    rows = random_rows(t, out_f, in_f, seed=5)
    layer = QuantLinear(rows, t, (out_f, in_f), torch.bfloat16, "cpu")
    layer.bias = torch.nn.Parameter(torch.randn(out_f).to(torch.bfloat16))
    x = torch.randn(2, 3, in_f)
    y = layer(x.to(torch.bfloat16))
    assert y.shape == (2, 3, out_f)
    ref = x @ dequantize(rows, t, (out_f, in_f)).T + layer.bias.float()
    assert _rel_err(y, ref) < TOL[torch.bfloat16]


def test_quant_linear_int4_falls_back_when_shape_unsupported():
    rows = random_rows(GGMLType.Q4_0, 24, 64)  # 24 output rows: not a multiple of 16
    layer = QuantLinear(rows, GGMLType.Q4_0, (24, 64), torch.bfloat16, "cpu")
    assert layer.backend == "blocks"
    x = torch.randn(3, 64)
    assert _rel_err(layer(x.to(torch.bfloat16)), x @ dequantize(rows, GGMLType.Q4_0, (24, 64)).T) < 2e-2


def test_quant_linear_int4_float32_is_near_exact():
    for t in INT4_TYPES:
        rows = random_rows(t, 32, 512, seed=9)
        layer = QuantLinear(rows, t, (32, 512), torch.float32, "cpu")
        x = torch.randn(4, 512)
        assert _rel_err(layer(x), x @ dequantize(rows, t, (32, 512)).T) < 1e-5


def test_quant_linear_real_tensors(testdata):
    reader = gguf.GGUFReader(testdata / "gguf" / "tiny-llama-Q4_K_M.gguf")
    seen = set()
    for info in reader.tensors:
        t = GGMLType(int(info.tensor_type))
        if len(info.shape) != 2 or t in seen or info.name == "token_embd.weight":
            continue
        seen.add(t)
        shape = tuple(int(s) for s in reversed(info.shape))
        rows = torch.from_numpy(np.array(info.data))
        layer = QuantLinear(rows, t, shape, torch.bfloat16, "cpu")
        x = torch.randn(3, shape[1])
        assert _rel_err(layer(x.to(torch.bfloat16)), x @ dequantize(rows, t, shape).T) < 2e-2, info.name
    assert seen == {GGMLType.Q4_K, GGMLType.Q6_K}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0],
                         ids=lambda t: t.name)
def test_quant_linear_cuda(t):
    out_f, in_f = 256, 1024
    rows = random_rows(t, out_f, in_f, seed=11)
    for dtype in (torch.bfloat16, torch.float16):
        layer = QuantLinear(rows, t, (out_f, in_f), dtype, torch.device("cuda"))
        assert layer.backend == ("int4" if t in INT4_TYPES and dtype == torch.bfloat16 else
                                 "int8" if t in INT8_TYPES else "blocks")
        x = torch.randn(7, in_f)
        y = layer(x.to("cuda", dtype))
        assert y.device.type == "cuda" and y.dtype == dtype
        assert _rel_err(y.cpu(), x @ dequantize(rows, t, (out_f, in_f)).T) < 2e-2
