"""Native int8-group kernel (ember.kernels) vs a float32 torch reference, and its fallbacks."""

from __future__ import annotations

import shutil

import pytest
import torch

from ember import kernels
from ember.kernels import native
from ember.quant.ggml import GGMLType, dequantize, random_rows
from ember.quant.linear import INT8_TYPES, QuantLinear

needs_native = pytest.mark.skipif(kernels.library() is None, reason="native kernels could not be built here")


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Float32 sums of the same products in another order: within a few ulps of sum |x| |w| per output."""
    ref = x.double() @ w.double().T
    bound = x.abs().double() @ w.abs().double().T
    err = (y.double() - ref).abs()
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert (err <= 1e-5 * bound + 1e-30).all(), (err / bound.clamp_min(1e-30)).max().item()
    assert torch.allclose(y, x @ w.T, rtol=1e-4, atol=1e-5 * bound.max().item())


@needs_native
@pytest.mark.parametrize("t", INT8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [1, 3, 8, 40])
def test_kernel_matches_dequantized_matmul(t, batch):
    out_f, in_f = 37, 512
    rows = random_rows(t, out_f, in_f, seed=int(t) * 100 + batch)
    layer = QuantLinear(rows, t, (out_f, in_f), torch.float32, "cpu")
    assert layer.backend == "int8"
    w = dequantize(rows, t, (out_f, in_f))
    x = torch.randn(batch, in_f)
    y = kernels.int8_group_matmul(x, layer.qs, layer.scales, layer.offsets)
    assert y is not None
    assert_close_to_reference(y, x, w)
    # through the layer: the kernel up to MAX_BATCH rows, the torch path above; both agree with the reference
    assert_close_to_reference(layer(x), x, w)


@needs_native
@pytest.mark.parametrize("group,with_offset", [(16, False), (16, True), (32, False), (32, True)])
@pytest.mark.parametrize("batch", [1, 2, 5, 9, 17])
@pytest.mark.parametrize("in_f", [96, 2080])  # one tile of K, several (1024 + 1024 + 32)
def test_kernel_random_int8(group, with_offset, batch, in_f):
    gen = torch.Generator().manual_seed(group * 1000 + batch * 10 + with_offset)
    out_f = 53
    q = torch.randint(-128, 128, (out_f, in_f), dtype=torch.int8, generator=gen)
    scale = torch.randn(out_f, in_f // group, generator=gen) * 0.01
    offset = torch.randn(out_f, in_f // group, generator=gen) * 0.1 if with_offset else None
    w = (scale.repeat_interleave(group, dim=1) * q.float())
    if offset is not None:
        w = w + offset.repeat_interleave(group, dim=1)
    x = torch.randn(batch, in_f, generator=gen)
    assert_close_to_reference(kernels.int8_group_matmul(x, q, scale, offset), x, w)
    # bf16 input is widened to float32 first; empty batches work
    xb = x.to(torch.bfloat16)
    assert_close_to_reference(kernels.int8_group_matmul(xb, q, scale, offset), xb.float(), w)
    assert kernels.int8_group_matmul(x[:0], q, scale, offset).shape == (0, out_f)


@needs_native
def test_kernel_declines_unsupported_layouts():
    q = torch.zeros(4, 64, dtype=torch.int8)
    assert kernels.int8_group_matmul(torch.randn(1, 64), q, torch.ones(4, 8)) is None  # group of 8
    assert kernels.int8_group_matmul(torch.randn(1, 48), q[:, :48], torch.ones(4, 3)) is None  # K % 32
    with pytest.raises(ValueError):
        kernels.int8_group_matmul(torch.randn(1, 32), q, torch.ones(4, 2))


@needs_native
def test_layer_uses_kernel_and_env_switch(monkeypatch):
    t, out_f, in_f = GGMLType.Q6_K, 19, 256
    rows = random_rows(t, out_f, in_f, seed=7)
    layer = QuantLinear(rows, t, (out_f, in_f), torch.bfloat16, "cpu")
    x = torch.randn(2, 3, in_f).to(torch.bfloat16)
    w = dequantize(rows, t, (out_f, in_f))
    ref = (x.float() @ w.T).to(torch.bfloat16)
    calls = []
    real = kernels.int8_group_matmul

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(kernels, "int8_group_matmul", spy)
    y_native = layer(x)
    assert calls == [(6, in_f)] and y_native.dtype == torch.bfloat16 and y_native.shape == (2, 3, out_f)
    assert torch.allclose(y_native.float(), ref.float(), rtol=1e-2, atol=1e-2)

    monkeypatch.setenv("EMBER_NATIVE_KERNELS", "0")
    assert kernels.library() is None
    y_torch = layer(x)
    assert y_torch.shape == (2, 3, out_f)
    assert ((y_torch.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2
    assert ((y_torch.float() - y_native.float()).norm() / ref.float().norm()).item() < 2e-2


@pytest.mark.parametrize("cc", ["no-such-cc", "false"])
def test_no_compiler_falls_back_silently(monkeypatch, tmp_path, cc):
    path = shutil.which(cc) or str(tmp_path / cc)  # a missing compiler, then one that always fails
    monkeypatch.setattr(native, "compiler", lambda: path)
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    native.reset()
    try:
        assert kernels.library() is None
        rows = random_rows(GGMLType.Q8_0, 21, 64, seed=1)
        layer = QuantLinear(rows, GGMLType.Q8_0, (21, 64), torch.float32, "cpu")
        x = torch.randn(3, 64)
        assert kernels.int8_group_matmul(x, layer.qs, layer.scales) is None
        assert_close_to_reference(layer(x), x, dequantize(rows, GGMLType.Q8_0, (21, 64)))
        assert not list((tmp_path / "cache").rglob("*.so"))
    finally:
        native.reset()


def test_missing_compiler_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.sysconfig, "get_config_var", lambda name: None)
    assert native.compiler() is None
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    native.reset()
    try:
        assert kernels.library() is None
    finally:
        native.reset()


@needs_native
def test_build_is_cached_and_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))
    native.reset()
    try:
        lib = kernels.library()
        assert lib is not None
        files = sorted(p.name for p in (tmp_path / "kernels").iterdir())
        assert len(files) == 1 and files[0].endswith(".so") and not files[0].startswith(".")
        native.reset()
        monkeypatch.setattr(native.subprocess, "run", None)  # a second build would fail: the cached file is used
        assert kernels.library() is not None
    finally:
        native.reset()


@needs_native
@pytest.mark.parametrize("flags", [("-fopenmp",), ()], ids=["portable-openmp", "portable-serial"])
def test_portable_build_matches(monkeypatch, tmp_path, flags):
    """The scalar fallback (built without -march=native, so without AVX2 on x86) gives the same results."""
    monkeypatch.setattr(native, "FLAG_SETS", (flags,))
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path))
    native.reset()
    try:
        lib = kernels.library()
        assert lib is not None
        if native.platform.machine() in ("x86_64", "AMD64"):
            assert lib.ember_kernels_simd() == 0
        gen = torch.Generator().manual_seed(3)
        for group, with_offset, batch, out_f in [(16, False, 1, 7), (32, True, 5, 6), (16, True, 11, 3)]:
            q = torch.randint(-128, 128, (out_f, 2048), dtype=torch.int8, generator=gen)
            scale = torch.randn(out_f, 2048 // group, generator=gen)
            offset = torch.randn(out_f, 2048 // group, generator=gen) if with_offset else None
            w = scale.repeat_interleave(group, dim=1) * q.float()
            if offset is not None:
                w = w + offset.repeat_interleave(group, dim=1)
            x = torch.randn(batch, 2048, generator=gen)
            assert_close_to_reference(kernels.int8_group_matmul(x, q, scale, offset), x, w)
    finally:
        native.reset()
