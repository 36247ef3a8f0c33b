"""The native LoRA kernel (ember/kernels/lora.c) on both ISA builds, the dtype adapters are held in, and the
estimator counting them in it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.engine.engine import EngineArgs
from ember.engine.lora import LoraRegistry
from ember.engine.lora_spec import LoraSpec
from ember.errors import InvalidParameter, ModelLoadError
from ember.kernels import native
from ember.kernels.lora import lora_delta
from ember.layers.lora import LoraBatch, LoraLayers, LoraLinear
from ember.layers.norm import RMSNorm
from ember.loader.dtypes import resolve_lora_dtype_name
from ember.loader.model import load_model
from ember.store.memory import estimate_memory
from tests.test_kernels import isa, needs_native  # noqa: F401  (isa: the fixture running each ISA build)
from tests.test_lora import DATA

AVX512_FLAGS = frozenset(native.ISA_REQUIRES["avx512"])


def _case(dtype: torch.dtype, big: bool = False):
    """Three adapters stacked as ember.layers.lora holds them, rows of each and of the base model, and the
    float64 reference: each row times its own adapter only. Small: ranks 3, 8, 5 and shapes with SIMD tails
    (one thread runs it); big: enough work that the kernel's threads share it."""
    gen = torch.Generator().manual_seed(0)
    ranks, in_f, out_f = ([16, 16, 16], 4000, 3000) if big else ([3, 8, 5], 70, 45)
    a = [torch.randn(r, in_f, generator=gen).to(dtype) for r in ranks]
    b = [torch.randn(out_f, r, generator=gen).to(dtype) for r in ranks]
    a_all, bt_all = torch.cat(a), torch.cat([m.t() for m in b]).contiguous()
    offsets = [sum(ranks[:i]) for i in range(len(ranks) + 1)]
    slots = [0, 1, 2, None, 1, 0, 2, 2, None] * (8 if big else 1)  # None: a base-model row
    ranges = torch.tensor([(0, 0) if s is None else (offsets[s], offsets[s + 1]) for s in slots],
                          dtype=torch.int32).t().contiguous()
    x = torch.randn(len(slots), in_f, generator=gen)
    wide = torch.randn(len(slots), out_f + 7, generator=gen)  # y is a view into it (row stride out_f + 7)
    expected = wide[:, 3:3 + out_f].double().clone()
    for t, s in enumerate(slots):
        if s is not None:
            expected[t] += (x[t].double() @ a[s].double().t()) @ b[s].double().t()
    return x, wide, a_all, bt_all, ranges, expected


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("big", [False, True])
def test_kernel_adds_each_rows_own_adapter(isa, dtype, big):  # noqa: F811
    x, wide, a_all, bt_all, ranges, expected = _case(dtype, big)
    before, out = wide.clone(), wide.shape[1] - 7
    assert lora_delta(x, wide[:, 3:3 + out], a_all, bt_all, ranges)  # the kernel ran (not a fallback)
    torch.testing.assert_close(wide[:, 3:3 + out].double(), expected, rtol=1e-5, atol=1e-3 if big else 1e-5)  # big: outputs ~250
    assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(wide[:, 3 + out:], before[:, 3 + out:])


@needs_native
@pytest.mark.parametrize("prep", ["rms_norm", "silu_gate"])
def test_kernel_folds_in_the_fused_projections_input_preparation(isa, prep):  # noqa: F811
    """RMSNorm (the fused q/k/v and gate/up kernels take the un-normed x) and the down projection's silu(gate) * up
    (its kernel takes [gate | up]) applied inside the kernel equal torch's, then the same low-rank product."""
    x, wide, a_all, bt_all, ranges, _ = _case(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    if prep == "rms_norm":
        norm = RMSNorm(x.shape[1], 1e-5)
        norm.weight = torch.nn.Parameter(torch.randn(x.shape[1], generator=gen))
        raw, prepared, args = x * 3, norm(x * 3), {"norm": (norm.effective_weight().contiguous(), norm.eps)}
    else:
        raw = torch.randn(x.shape[0], 2 * x.shape[1], generator=gen)
        prepared, args = F.silu(raw[:, :x.shape[1]]) * raw[:, x.shape[1]:], {"silu_gate": True}
    expected = wide[:, 3:48].clone()
    assert lora_delta(prepared, expected, a_all, bt_all, ranges)
    assert lora_delta(raw, wide[:, 3:48], a_all, bt_all, ranges, **args)
    torch.testing.assert_close(wide[:, 3:48], expected, rtol=1e-5, atol=1e-5)


@needs_native
def test_kernel_refuses_what_it_does_not_read():
    x, wide, a_all, bt_all, ranges, _ = _case(torch.float32)
    assert not lora_delta(x, wide[:, 3:48], a_all.half(), bt_all.half(), ranges)  # float16 adapters: torch's path
    assert not lora_delta(x.double(), wide[:, 3:48].double(), a_all, bt_all, ranges)
    assert not lora_delta(x, wide[:, 3:48], a_all, bt_all, ranges.long())


@pytest.mark.parametrize(("flags", "env", "activation", "device", "expected"), [
    (AVX512_FLAGS | {"avx512_bf16"}, {}, "float32", "cpu", "bfloat16"),  # native bf16: half the bytes read
    (AVX512_FLAGS | {"avx512_bf16"}, {"EMBER_ISA": "avx2"}, "float32", "cpu", "float32"),
    (AVX512_FLAGS | {"avx512_bf16"}, {"EMBER_NATIVE_KERNELS": "0"}, "float32", "cpu", "float32"),
    (AVX512_FLAGS, {}, "float32", "cpu", "float32"),  # AVX-512 without BF16: bf16 would be emulated
    (AVX512_FLAGS | {"avx512_bf16"}, {}, "bfloat16", "cpu", "bfloat16"),
    (AVX512_FLAGS | {"avx512_bf16"}, {}, "float16", "cuda", "float16"),
    (AVX512_FLAGS | {"avx512_bf16"}, {}, "float32", "cuda", "float32"),
])
def test_auto_lora_dtype_follows_the_cpu(monkeypatch, flags, env, activation, device, expected):
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("EMBER_ISA", raising=False)
    monkeypatch.delenv("EMBER_NATIVE_KERNELS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert resolve_lora_dtype_name("auto", activation, device) == expected


def test_explicit_lora_dtype():
    assert resolve_lora_dtype_name("fp32", "float32", "cpu") == "float32"
    assert resolve_lora_dtype_name("bf16", "float32", "cpu") == "bfloat16"
    with pytest.raises(ModelLoadError, match="lora_dtype"):
        resolve_lora_dtype_name("int4", "float32", "cpu")
    with pytest.raises(InvalidParameter, match="lora_dtype"):
        EngineArgs(lora_dtype="int4")


@pytest.mark.parametrize("lora_dtype", ["auto", "float32", "bfloat16"])
def test_estimator_counts_adapters_in_their_dtype(testdata, lora_dtype):
    """What estimate_memory adds for an adapter is what the registry holds once it is loaded, in the same dtype."""
    base, adapter = testdata / "gguf" / "tiny-llama-hf", DATA / "peft"
    registry = LoraRegistry(load_model(base, dtype="float32", device="cpu"), lora_dtype)
    held = registry.read(LoraSpec("a", str(adapter))).nbytes
    assert str(registry.dtype).removeprefix("torch.") == resolve_lora_dtype_name(lora_dtype, "float32", "cpu")
    without = estimate_memory(base, 256, "float32", "cpu")
    with_adapter = estimate_memory(base, 256, "float32", "cpu", adapters=[adapter], lora_dtype=lora_dtype)
    assert with_adapter.weights_bytes - without.weights_bytes == held


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("ranks", [(3, 8, 5), (300, 200, 400)])  # the second: 700 kept, past MAX_STACKED_RANK
def test_layer_paths_equal_each_rows_own_adapter(monkeypatch, path, ranks):
    """LoraLinear over a plain linear base: the native kernel, torch's masked stacked form and its loop over
    adapters (past MAX_STACKED_RANK) all add each row's own adapter, for a mixed batch and a one-adapter batch;
    an adapter removed leaves the others' spans right."""
    if path == "torch":
        monkeypatch.setenv("EMBER_NATIVE_KERNELS", "0")
    elif native.library() is None:
        pytest.skip("native kernels unavailable")
    gen = torch.Generator().manual_seed(2)
    layers = LoraLayers()
    linear = LoraLinear(torch.nn.Linear(48, 40, bias=False), layers)
    pairs = {slot: (torch.randn(r, 48, generator=gen) / 8, torch.randn(40, r, generator=gen) / 8)
             for slot, r in zip((1, 2, 3), ranks, strict=True)}
    for slot, pair in pairs.items():
        linear.add(slot, pair)
    linear.remove(2)
    x = torch.randn(7, 48, generator=gen)
    for slots in ([1, 0, 3, 3, 2, 1, 0], [3] * 7):  # slot 2 was removed: its rows get the base output
        layers.batch = LoraBatch.from_rows(slots, x.device)
        with torch.no_grad():
            got = linear(x)
            expected = linear.base(x)
            for t, slot in enumerate(slots):
                if slot in (1, 3):
                    a, b = pairs[slot]
                    expected[t] += x[t] @ a.t() @ b.t()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
