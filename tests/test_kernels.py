"""Native GGML kernels (ember.kernels) against gguf's reference dequantization, on every ISA path this CPU runs.

The kernels quantize the activations to int8 as llama.cpp does (Q8_0 for 32-value types, Q8_K for the 256-value
ones); the reference below does the same in torch, so the only difference left is float32 summation order and
the tolerance can be tight (a wrong scale on one sub-block of a 256-value block moves the result by far more).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ember.kernels import matmul as kernels
from ember.kernels import native
from ember.quant.ggml import BLOCK_SIZES, GGMLType, random_rows
from ember.quant.linear import QuantLinear, fuse_linears

QUANT_TYPES = sorted(t for t in native.NATIVE_TYPES if BLOCK_SIZES[t][0] > 1)
HALF_TYPES = [GGMLType.BF16, GGMLType.F16]
# The ISA paths this CPU can run: AVX2 always where the kernels exist, AVX-512 VNNI where present.
ISAS = [name for name in ("avx2", "avx512") if native.ISA_REQUIRES[name] <= native.cpu_flags()]

needs_native = pytest.mark.skipif(not ISAS or native.compiler() is None,
                                  reason="native kernels need x86-64 AVX2 and a C compiler")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("EMBER_ISA", request.param)
    assert native.isa() == request.param
    lib = native.library()
    assert lib is not None
    # 2 = AVX-512 VNNI dot products; the AVX2 build must use maddubs (0), whatever this CPU has
    assert lib.ember_kernels_isa() == (2 if request.param == "avx512" else 0)
    return request.param


def weight(t: GGMLType, out_f: int, in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows in the file layout, the float64 weight gguf's reference dequantizes them to)."""
    if t in HALF_TYPES:
        dtype = torch.bfloat16 if t == GGMLType.BF16 else torch.float16
        w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)
        return w.view(torch.uint8).reshape(out_f, -1), w.double()
    rows = random_rows(t, out_f, in_f, seed=seed)
    ref = gguf.quants.dequantize(rows.numpy(), gguf.GGMLQuantizationType(int(t)))
    return rows, torch.from_numpy(np.array(ref)).double().reshape(out_f, in_f)


def llamacpp_activations(x: torch.Tensor, t: GGMLType) -> torch.Tensor:
    """x as the kernels see it: quantized to int8 and back, Q8_K-style for 256-value types, else Q8_0-style;
    rounded to bf16 for bf16 weights where the build uses AVX512-BF16 dot products; else as it is."""
    if t == GGMLType.BF16 and native.bf16_dot(native.isa()):
        return x.bfloat16().double()
    if t in HALF_TYPES:
        return x.double()
    batch, k = x.shape
    if BLOCK_SIZES[t][0] == 256:  # Q8_K: scale -127 / (the signed extreme), q capped at 127
        xb = x.view(batch, -1, 256)
        extreme = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
        iscale = torch.where(extreme != 0, -127.0 / extreme, torch.zeros_like(extreme))
        q = torch.round(xb * iscale).clamp(max=127)
        d = torch.where(extreme != 0, 1.0 / iscale, torch.zeros_like(iscale))
    else:  # Q8_0: d = amax / 127 rounded to fp16, q = round(x * 127 / amax)
        xb = x.view(batch, -1, 32)
        amax = xb.abs().amax(-1, keepdim=True)
        d = (amax / 127.0).half().float()
        q = torch.round(xb * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax)))
    return (q.double() * d.double()).view(batch, k)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


# Every row count the direct loops specialise (1..8 rows of x per pass, then a second pass) and the tile paths
# (from 16 to 64 rows by type and ISA: ggml_matmul.c's gemm_min_b), with a remainder after the tiles' 4 or 8 rows.
BATCHES = [*range(1, 21), 23, 37, 47, 50, 67]


@needs_native
@pytest.mark.parametrize("t", QUANT_TYPES + HALF_TYPES, ids=lambda t: t.name)
def test_matmul_matches_reference(isa, t):
    """One weight against x of every row count in BATCHES; each count's product is checked on its own. The
    32-value types get 25 blocks per row: the loops take 8 at a time, then the last one alone."""
    out_f, in_f = 40, 512 if BLOCK_SIZES[t][0] == 256 else 800
    rows, w = weight(t, out_f, in_f, seed=int(t) * 7)
    layer = kernels.NativeMatmul([(rows, t)], in_f)
    for batch in BATCHES:
        x = torch.randn(batch, in_f) * torch.linspace(0.1, 3.0, in_f)  # uneven magnitudes, as hidden states have
        y = layer(x)
        assert y.dtype == torch.float32 and y.shape == (batch, out_f)
        assert rel_err(y, llamacpp_activations(x, t) @ w.T) < 2e-6, batch
        # and, looser, against the unquantized activations: int8 rounding is all that separates them
        assert rel_err(y, x.double() @ w.T) < 2e-2, batch
        # each row on its own: a row that came out wrong only in some position of a pass would show here
        row_err = (y.double() - llamacpp_activations(x, t) @ w.T).norm(dim=1) / (x.double() @ w.T).norm(dim=1)
        assert row_err.max().item() < 2e-6, batch


@needs_native
@pytest.mark.parametrize("in_f", [544, 1058, 515], ids=lambda k: f"K{k}")
def test_bf16_prefill_gemm_matches_reference(isa, in_f):
    """Prefill-sized x on bf16 weights: with AVX512-BF16, whole 64-row panels go through the packed GEMM and
    the remaining rows (and an odd K) through the dot-product tiles. 229 rows = 3 panels + 37; 64..69 rows of x
    leave every remainder (0..5) after the 6-row micro-tiles; K 544 is whole 16-pair blocks of the packing
    transpose, 1058 leaves a tail of pairs, 515 is odd. One and two threads split the rows differently."""
    rows, w = weight(GGMLType.BF16, 229, in_f, seed=in_f)
    layer = kernels.NativeMatmul([(rows, GGMLType.BF16)], in_f)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for batch in range(64, 70):
                x = torch.randn(batch, in_f)
                y = layer(x)
                ref = llamacpp_activations(x, GGMLType.BF16) @ w.T
                row_err = (y.double() - ref).norm(dim=1) / ref.norm(dim=1)
                assert row_err.max().item() < 2e-6, (n, batch)
    finally:
        torch.set_num_threads(threads)


@needs_native
@pytest.mark.parametrize("t", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q4_0], ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [6, 20])
def test_isa_paths_and_thread_counts_agree(t, batch, monkeypatch):
    """Each row is summed by one thread in one order: every thread count gives the same bits. The ISA paths
    sum the same exact integer products in float32 in different orders (8 or 16 lanes): equal to rounding."""
    rows, _ = weight(t, 300, 1024, seed=5)
    x = torch.randn(batch, 1024)
    threads = torch.get_num_threads()
    by_isa = {}
    try:
        for name in ISAS:
            monkeypatch.setenv("EMBER_ISA", name)
            results = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results.append(kernels.NativeMatmul([(rows, t)], 1024)(x))
            for y in results[1:]:
                assert torch.equal(y, results[0])
            by_isa[name] = results[0]
    finally:
        torch.set_num_threads(threads)
    for y in by_isa.values():
        assert rel_err(y, by_isa["avx2"].double()) < 1e-6


@needs_native
def test_fused_segments_equal_separate_calls(isa):
    in_f = 512
    parts = [weight(t, n, in_f, seed=n)[0] for t, n in ((GGMLType.Q4_K, 64), (GGMLType.Q6_K, 16),
                                                        (GGMLType.Q4_K, 48))]
    types = [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q4_K]
    x = torch.randn(5, in_f)
    fused = kernels.NativeMatmul(list(zip(parts, types, strict=True)), in_f)(x)
    separate = torch.cat([kernels.NativeMatmul([(r, t)], in_f)(x) for r, t in zip(parts, types, strict=True)], 1)
    assert torch.equal(fused, separate)


@needs_native
def test_fuse_linears_layers(isa):
    in_f = 256
    layers = []
    for i, t in enumerate((GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q6_K)):
        rows, _ = weight(t, 32 * (i + 1), in_f, seed=i)
        layer = QuantLinear(rows, t, (32 * (i + 1), in_f), torch.float32, "cpu")
        layer.bias = torch.nn.Parameter(torch.randn(32 * (i + 1))) if i == 1 else None
        layers.append(layer)
    fused = fuse_linears(layers)
    assert fused is not None
    x = torch.randn(2, 3, in_f)
    for got, layer in zip(fused(x), layers, strict=True):
        assert got.shape == (2, 3, layer.out_features)
        assert torch.allclose(got, layer(x), atol=1e-5)
    # 32-value and 256-value types quantize x differently: not one call
    q8 = QuantLinear(weight(GGMLType.Q8_0, 32, in_f, 1)[0], GGMLType.Q8_0, (32, in_f), torch.float32, "cpu")
    assert fuse_linears([layers[0], q8]) is None


@needs_native
@pytest.mark.parametrize("t", QUANT_TYPES + HALF_TYPES, ids=lambda t: t.name)
def test_quant_linear_native_backend(isa, t):
    out_f, in_f = 48, 512
    rows, w = weight(t, out_f, in_f, seed=3)
    snapshot = rows.clone()
    layer = QuantLinear(rows, t, (out_f, in_f), torch.float32, "cpu")
    assert layer.backend == "native"
    assert layer.rows.data_ptr() == rows.data_ptr()  # the file's bytes, not a repacked copy
    assert torch.equal(layer.dequantized_weight().double(), w)
    x = torch.randn(7, in_f)
    assert rel_err(layer(x), llamacpp_activations(x, t) @ w.T) < 2e-6
    assert torch.equal(rows, snapshot)  # never writes into the (read-only mmap) rows
    assert layer(x.to(torch.bfloat16)).dtype == torch.float32  # activations of any dtype: float32 layer


def test_isa_override_and_fallback(monkeypatch, caplog):
    flags = native.cpu_flags()
    detected = native._detect("auto", "x86_64", flags)
    assert native._detect("none", "x86_64", flags) == "none"
    assert native._detect("auto", "aarch64", flags) == "none"
    assert native._detect("avx2", "x86_64", frozenset({"avx2", "fma", "f16c"})) == "avx2"
    with caplog.at_level("WARNING"):
        # a CPU without AVX-512 cannot run the AVX-512 build: the detected ISA is used, with a warning
        assert native._detect("avx512", "x86_64", frozenset({"avx2", "fma", "f16c"})) == "avx2"
        assert native._detect("sse9", "x86_64", flags) == detected
    assert "lacks" in caplog.text and "sse9" in caplog.text


def test_disabled_kernels_fall_back_to_torch(monkeypatch):
    monkeypatch.setenv("EMBER_NATIVE_KERNELS", "0")
    assert native.library() is None and not kernels.available(GGMLType.Q4_K, 256)
    rows, w = weight(GGMLType.Q6_K, 32, 256, seed=1)
    layer = QuantLinear(rows, GGMLType.Q6_K, (32, 256), torch.float32, "cpu")
    assert layer.backend == "int8"
    x = torch.randn(3, 256)
    assert rel_err(layer(x), x.double() @ w.T) < 1e-5
    assert fuse_linears([layer, layer]) is None


def test_no_compiler_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "compiler", lambda: None)
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))
    native._load.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert native._load("avx2") is None
        assert "no C compiler" in caplog.text
    finally:
        native._load.cache_clear()


@needs_native
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_fused_rms_norm_equals_the_module(isa, offset):
    """The norm folded into the kernel's input preparation gives what RMSNorm then the projections give."""
    from ember.layers.norm import RMSNorm

    in_f = 512
    norm = RMSNorm(in_f, 1e-5, offset)
    norm.weight = torch.nn.Parameter(torch.randn(in_f))
    layers = [QuantLinear(weight(t, 64, in_f, seed=i)[0], t, (64, in_f), torch.float32, "cpu")
              for i, t in enumerate((GGMLType.Q4_K, GGMLType.Q6_K))]
    x = torch.randn(5, in_f) * 3
    fused = fuse_linears(layers, norm)
    assert fused is not None
    for got, layer in zip(fused(x), layers, strict=True):
        expected = layer(norm(x))
        assert rel_err(got, expected.double()) < 1e-5
    # bf16 activations round differently between the norm and the projection: not folded
    bf16 = [QuantLinear(weight(GGMLType.Q4_K, 64, in_f, 0)[0], GGMLType.Q4_K, (64, in_f), torch.bfloat16, "cpu")]
    assert fuse_linears(bf16, norm) is None


@needs_native
def test_silu_gate_folded_into_down_projection(isa):
    in_f = 256
    down = QuantLinear(weight(GGMLType.Q4_K, 64, in_f, seed=2)[0], GGMLType.Q4_K, (64, in_f), torch.float32, "cpu")
    gate_up = torch.randn(2, 3, 2 * in_f) * 2
    gate, up = gate_up.split(in_f, dim=-1)
    expected = down(torch.nn.functional.silu(gate) * up)
    got = down.silu_gated(gate_up)
    assert got.shape == (2, 3, 64)
    assert rel_err(got, expected.double()) < 1e-5
