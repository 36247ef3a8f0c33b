"""Hostile model files: 200 seeded mutants of the small fixtures (scripts/fuzz_model_files.py --small), and one
regression test per loader bug the full 2,000-mutant run found."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from ember.errors import ModelLoadError

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_model_files.py"


def _fuzzer():
    if "fuzz_model_files" not in sys.modules:  # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("fuzz_model_files", SCRIPT)
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules["fuzz_model_files"]


def test_mutants_load_and_run_or_are_refused_cleanly(testdata):
    """Each mutant loads and runs a token, or raises an EmberError with a one-line message; none crashes the
    worker, hangs, takes over 5 s or grows RSS over 2x the file (the fuzzer's rules); both outcomes occur."""
    fuzz = _fuzzer()
    results = fuzz.run_campaign(200, seed=20261202, small=True, workers=2)
    report = fuzz.summary(results, 20261202, small=True)
    assert report["findings"] == [], json.dumps(report["findings"], indent=1)
    assert report["count"] == 200
    assert report["outcomes"]["ran"] >= 10 and report["outcomes"]["refused"] >= 100, report["outcomes"]


def test_fuzzer_reports_a_crash_and_a_hang(monkeypatch):
    """The harness itself: a worker killed by a signal is a crash, one that stops answering is a hang, and the
    next mutants still run in a fresh worker."""
    fuzz = _fuzzer()
    monkeypatch.setenv("EMBER_FUZZ_SELF_TEST", "1")
    results = fuzz.run_campaign(3, seed=0, small=True, workers=1, limit_s=1.0, hang_after=3)
    assert [r["outcome"] for r in results[:2]] == ["crash", "hang"], results
    assert "Fatal Python error: Segmentation fault" in results[0]["detail"]
    assert results[2]["outcome"] in ("ran", "refused"), results


def _checkpoint(tmp_path: Path, testdata: Path, **changes) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(testdata / "gguf" / "tiny-llama-hf", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"architectures": 3}, "config.json: architectures must be a list of names, not 3"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of names"),
    ({"model_type": ["llama"]}, "config.json: model_type must be a name"),
])
def test_config_json_wrong_types_are_load_errors(tmp_path, testdata, changes, message):
    from ember.loader.model import load_model

    with pytest.raises(ModelLoadError, match=message):
        load_model(_checkpoint(tmp_path, testdata, **changes))


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 2**31}, r"config: num_hidden_layers=2147483648 is out of range \(1 to 1024\)"),
    ({"num_hidden_layers": -1}, r"num_hidden_layers=-1 is out of range"),
    ({"num_hidden_layers": True}, r"num_hidden_layers=True is out of range"),
])
def test_layer_count_is_checked_before_per_layer_lists_are_made(tmp_path, testdata, changes, message):
    """num_hidden_layers = 2**31 used to build a list of 2**31 sliding windows (16 GB) before the range check."""
    from ember.loader.model import load_model

    with pytest.raises(ModelLoadError, match=message):
        load_model(_checkpoint(tmp_path, testdata, **changes))


def _patched(tmp_path: Path, source: Path, marker: bytes, skip: int, value: bytes) -> Path:
    """A copy of a GGUF with `value` written `skip` bytes after the length-prefixed string `marker`."""
    data = bytearray(source.read_bytes())
    at = data.index(len(marker).to_bytes(8, "little") + marker) + 8 + len(marker) + skip
    data[at:at + len(value)] = value
    out = tmp_path / "patched.gguf"
    out.write_bytes(data)
    return out


DEFAULT = Path(__file__).resolve().parent.parent / "ember" / "assets" / "ember-default-bf16.gguf"


@pytest.mark.parametrize("key, value, message", [
    # (uint32 values: 4 bytes of value type, then the value)
    (b"llama.block_count", 2**31, r"num_hidden_layers=2147483648 is out of range"),
    (b"llama.attention.head_count", 0, r"ember-default-bf16.gguf: malformed model metadata \(ZeroDivisionError"),
])
def test_gguf_metadata_values_are_checked(tmp_path, key, value, message):
    from ember.loader.model import load_model

    path = _patched(tmp_path, DEFAULT, key, 4, value.to_bytes(4, "little"))
    path = path.rename(tmp_path / DEFAULT.name)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_load_errors_name_the_model(tmp_path, testdata):
    """An error raised where the file is not known (the config check) gets the model's folder name in front."""
    from ember.loader.model import load_model

    with pytest.raises(ModelLoadError, match=r"^model: config: intermediate_size=-5 is not a positive integer"):
        load_model(_checkpoint(tmp_path, testdata, intermediate_size=-5))


@pytest.mark.parametrize("changes, message", [
    ({"rope_parameters": {"rope_theta": -1.0, "rope_type": "yarn"}}, r"config: rope_theta=-1.0 is not a positive"),
    ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "original_max_position_embeddings": 0}},
     r"config: unusable model settings \(ZeroDivisionError"),
    ({"partial_rotary_factor": 3e9}, r"partial_rotary_factor=3000000000.0 is not in \(0, 1\]"),
    ({"max_position_embeddings": -1}, r"max_position_embeddings=-1 is not a positive integer"),
])
def test_rope_settings_are_checked(tmp_path, testdata, changes, message):
    """A negative rope theta with yarn scaling raised `ValueError: math domain error`; a rotary dimension of
    2**32 heads' worth tried to allocate 16 GB."""
    from ember.loader.model import load_model

    with pytest.raises(ModelLoadError, match=message):
        load_model(_checkpoint(tmp_path, testdata, **changes))


def test_gguf_rotary_dimension_count_is_checked(tmp_path):
    from ember.loader.model import load_model

    path = _patched(tmp_path, DEFAULT, b"llama.rope.dimension_count", 4, (2**32 - 1).to_bytes(4, "little"))
    with pytest.raises(ModelLoadError, match=r"partial_rotary_factor=134217727.96875 is not in \(0, 1\]"):
        load_model(path)


@pytest.mark.parametrize("tensor, rows, message", [
    # a quantized matrix declaring half its rows (ne[1] 768 -> 384) used to reach QuantLinear and fail with a
    # ValueError
    (b"blk.2.ffn_up.weight", 384,
     r"patched.gguf: tensor 'blk.2.ffn_up.weight' of shape \(384, 256\) does not match the metadata's \(768, 256\)"),
    # 63 rows of blk.0.attn_k.weight (2 KV heads) made the row unpermutation fail with a RuntimeError
    (b"blk.0.attn_k.weight", 63,
     r"patched.gguf: tensor 'blk.0.attn_k.weight': 63 rows do not split into 2 heads of two rotary halves"),
], ids=["rows-vs-metadata", "k-rows-vs-heads"])
def test_gguf_tensor_rows_are_checked(tmp_path, testdata, tensor, rows, message):
    """A tensor's row count patched in the file (after its name: n_dims, 4 bytes, and ne[0], 8 bytes, then
    ne[1]) is refused with ember's error naming the file and the tensor."""
    from ember.loader.model import load_model

    path = _patched(tmp_path, testdata / "gguf" / "tiny-llama-Q4_0.gguf", tensor, 12, rows.to_bytes(8, "little"))
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)
