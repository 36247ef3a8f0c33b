"""Model store: names, blobs and manifests, the resolver, the memory estimator, ls/show/rm/cp in-process."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ember.cli.main import main
from ember.errors import EmberError, GGUFError, ModelLoadError
from ember.store.info import format_size
from ember.store.memory import estimate_memory, fit_context
from ember.store.names import parse_ref, parse_store_name
from ember.store.resolve import DEFAULT_MODEL_DIR, resolve
from ember.store.store import BlobInfo, ModelStore

ENV_VARS = ("EMBER_HOME", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "OLLAMA_MODELS", "EMBER_MODELS_PATH")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fake HOME with an empty store; no tool's real folders are seen, and no network."""
    home = tmp_path / "home"
    home.mkdir()

    def refuse(*args, **kwargs):
        raise AssertionError("tests must not reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("EMBER_HOME", str(home / ".ember"))
    monkeypatch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    return home


@pytest.fixture
def gguf_q4(testdata) -> Path:
    return testdata / "gguf" / "tiny-llama-Q4_0.gguf"


@pytest.fixture
def hf_dir(testdata) -> Path:
    return testdata / "gguf" / "tiny-llama-hf"


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- names ---------------------------------------------------------------------------------------------

HOSTILE = [
    ("../etc/passwd", "path"),
    ("/etc/passwd", "path"),
    ("~/models/x.gguf", "path"),
    ("C:\\models\\x.gguf", "path"),
    ("foo\\bar", "path"),
    ("a\x00b", "NUL"),
    ("line\nbreak", "control"),
    ("sha256:" + "a" * 64, "digest"),
    ("sha256-" + "a" * 64, "digest"),
    ("sha256:xyz", "digest"),
    ("a" * 400, "longer"),
    ("foo:../../x", "'..'"),
    ("foo/../bar", "'..'"),
    ("org/repo:../x", "'..'"),
    ("hf.co/../x", "'..'"),
    ("ollama/../../etc", "'..'"),
    ("..", "path"),
    (".hidden", "expected family"),
    ("-flag", "expected family"),
    ("a b", "characters"),
    ("foo;rm -rf", "characters"),
    ("$(reboot)", "characters"),
    ("fam:tag:extra", "characters"),
    ("modèle", "characters"),
    ("org//repo", "one '/'"),
    ("org/repo/extra", "one '/'"),
    ("org--x/repo", "'--'"),
    ("org/repo.git", ".git"),
    ("org/-repo", "start"),
    ("org/repo:", "after the repo id"),
    ("org/repo:q4 k", "characters"),
    ("lmstudio/a/b/c/d/e", "too many"),
    ("local/", "part"),
    ("fam:" + "t" * 65, "expected family"),
    (" foo", "spaces"),
]


@pytest.mark.parametrize(("ref", "problem"), HOSTILE)
def test_hostile_names_are_rejected_from_http(ref, problem):
    with pytest.raises(ModelLoadError) as err:
        parse_ref(ref, allow_paths=False)
    assert problem in str(err.value)
    assert "\x00" not in str(err.value) and len(str(err.value)) < 300


@pytest.mark.parametrize(("ref", "kind", "text"), [
    ("llama3", "store", "llama3:latest"),
    ("Qwen2.5:Q4_K_M", "store", "qwen2.5:q4_k_m"),
    ("tiny-llama_1.1b:v2", "store", "tiny-llama_1.1b:v2"),
    ("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "hf", "Qwen/Qwen2.5-0.5B-Instruct-GGUF"),
    ("Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M", "hf", "Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"),
    ("bartowski/Llama-3.2-1B-GGUF:Llama-3.2-1B-Q8_0.gguf", "hf", "bartowski/Llama-3.2-1B-GGUF:Llama-3.2-1B-Q8_0.gguf"),
    ("hf.co/org/repo:Q4_0", "hf", "org/repo:Q4_0"),
    ("ollama/llama3.2:3b", "discovered", "ollama/llama3.2:3b"),
    ("lmstudio/pub/repo/file-Q4_0.gguf", "discovered", "lmstudio/pub/repo/file-Q4_0.gguf"),
    ("local/tiny", "discovered", "local/tiny"),
])
def test_valid_names(ref, kind, text):
    parsed = parse_ref(ref, allow_paths=False)
    assert (parsed.kind, parsed.text) == (kind, text)


def test_paths_and_digests_only_where_allowed(gguf_q4):
    assert parse_ref(str(gguf_q4), allow_paths=True).path == gguf_q4
    assert parse_ref(gguf_q4, allow_paths=True).kind == "path"
    with pytest.raises(ModelLoadError, match="not allowed"):
        parse_ref(gguf_q4, allow_paths=False)
    with pytest.raises(ModelLoadError, match="not allowed"):
        parse_ref(str(gguf_q4), allow_paths=False)
    with pytest.raises(ModelLoadError, match="not found"):
        parse_ref("/no/such/model.gguf", allow_paths=True)
    assert parse_ref("sha256:" + "b" * 64, allow_digest=True).digest == "b" * 64
    assert parse_ref(None).kind == parse_ref("").kind == "default"
    with pytest.raises(ModelLoadError, match="string"):
        parse_ref(42)


def test_store_names_reject_slashes_and_digests():
    for bad in ("org/repo", "sha256:" + "0" * 64, "a..b", "x:.."):
        with pytest.raises(ModelLoadError):
            parse_store_name(bad)
    assert parse_store_name("Fam").store_name == "fam:latest"


# ---- store ---------------------------------------------------------------------------------------------

def test_add_file_dedups_and_leaves_no_temp(tmp_path, gguf_q4):
    store = ModelStore(tmp_path / "s")
    a = store.add_file("a.gguf", gguf_q4)
    b = store.add_file("b.gguf", io.BytesIO(gguf_q4.read_bytes()))
    assert a == b and a.size == gguf_q4.stat().st_size
    assert [p.name for p in store.blobs.iterdir()] == [f"sha256-{a.digest}"]
    assert list(store.tmp.iterdir()) == []
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        store.add_file("c", io.BytesIO(b"other"), expected_sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="size mismatch"):
        store.add_file("c", io.BytesIO(b"other"), expected_size=3)
    assert len(list(store.blobs.iterdir())) == 1 and list(store.tmp.iterdir()) == []


def test_register_get_path_for_remove(home, gguf_q4, hf_dir):
    store = ModelStore()
    assert store.root == (home / ".ember").resolve()
    m = store.register("tiny:q4_0", {"tiny-llama-Q4_0.gguf": gguf_q4}, {"type": "test"})
    assert m.format == "gguf" and m.details["quant"] == "Q4_0" and m.details["parameters"] > 10_000_000
    data = json.loads((store.manifests / "tiny" / "q4_0.json").read_text())
    assert data["files"]["tiny-llama-Q4_0.gguf"]["digest"].startswith("sha256:")
    path = store.path_for("tiny:q4_0")
    assert path.name == "tiny-llama-Q4_0.gguf" and path.read_bytes()[:4] == b"GGUF"
    assert path.resolve().is_relative_to(store.root)

    files = {p.name: p for p in hf_dir.iterdir()}
    m2 = store.register("tinyhf", files, {"type": "test"})
    assert m2.name == "tinyhf:latest" and m2.format == "safetensors"
    folder = store.path_for("tinyhf")
    assert folder.is_dir() and (folder / "config.json").read_text() == (hf_dir / "config.json").read_text()
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    assert [x.name for x in store.list()] == ["tiny:q4_0", "tinyhf:latest"]

    store.copy("tiny:q4_0", "alias:v1")
    blobs = sorted(store.blobs.iterdir())
    assert len(blobs) == 1 + len(files)  # cp adds no blob
    with pytest.raises(ModelLoadError, match="already exists"):
        store.copy("tinyhf", "alias:v1")
    store.remove("tiny:q4_0")
    assert store.blob_path(m.files["tiny-llama-Q4_0.gguf"].digest).exists()  # alias:v1 still uses it
    store.remove("alias:v1")
    assert not store.blob_path(m.files["tiny-llama-Q4_0.gguf"].digest).exists()
    assert not (store.models / "tiny").exists() and not (store.manifests / "tiny").exists()
    with pytest.raises(ModelLoadError, match="not in the store"):
        store.get("tiny:q4_0")


def test_failed_register_leaves_nothing(home, gguf_q4, tmp_path):
    store = ModelStore()
    with pytest.raises(OSError):
        store.register("x:y", {"a.gguf": gguf_q4, "config.json": tmp_path / "missing.json"}, {})
    with pytest.raises(ModelLoadError, match="one GGUF"):
        store.register("x:y", {"a.gguf": gguf_q4, "b.gguf": gguf_q4}, {})
    with pytest.raises(ModelLoadError, match="bad file name"):
        store.register("x:y", {"../a.gguf": gguf_q4}, {})
    with pytest.raises(ModelLoadError, match="not in the store"):
        store.register("x:y", {"a.gguf": BlobInfo("1" * 64, 3)}, {})
    assert store.list() == [] and list(store.blobs.iterdir()) == [] and list(store.tmp.iterdir()) == []


def test_paths_stay_inside_the_root(home, tmp_path, gguf_q4):
    store = ModelStore()
    store.register("tiny", {"t.gguf": gguf_q4}, {})
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.manifests / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelLoadError, match="outside the model store"):
        store.manifest_path("evil:latest")
    with pytest.raises(ModelLoadError, match="bad digest"):
        store.blob_path("../../etc/passwd")
    bad = store.manifests / "tiny" / "broken.json"
    bad.write_text(json.dumps({"name": "x", "format": "gguf", "files": {"../x": {"digest": "sha256:" + "a" * 64,
                                                                                 "size": 1}}}))
    assert [m.name for m in store.list()] == ["tiny:latest"]  # the hostile manifest is skipped
    with pytest.raises(ModelLoadError, match="malformed manifest"):
        store.get("tiny:broken")


# ---- resolver -----------------------------------------------------------------------------------------

def test_resolve(home, gguf_q4, hf_dir):
    assert resolve(None, allow_paths=False).path == DEFAULT_MODEL_DIR
    r = resolve(str(gguf_q4), allow_paths=True)
    assert (r.path, r.format, r.source) == (gguf_q4, "gguf", "path")
    assert resolve(str(hf_dir), allow_paths=True).format == "safetensors"
    with pytest.raises(ModelLoadError, match="not allowed"):
        resolve(str(gguf_q4), allow_paths=False)
    with pytest.raises(ModelLoadError, match=r"model 'tiny:latest' not found; try `ember pull tiny:latest`"):
        resolve("tiny", allow_paths=False)
    ModelStore().register("tiny:q4_0", {"tiny-llama-Q4_0.gguf": gguf_q4}, {})
    r = resolve("tiny:Q4_0", allow_paths=False)
    assert (r.name, r.format, r.source) == ("tiny:q4_0", "gguf", "store")
    assert r.path.read_bytes() == gguf_q4.read_bytes()
    with pytest.raises(ModelLoadError, match="tiny has tags: q4_0"):
        resolve("tiny", allow_paths=False)
    with pytest.raises(ModelLoadError, match="not found; try `ember pull org/repo`"):
        resolve("org/repo", allow_paths=False)
    with pytest.raises(ModelLoadError, match="not found"):
        resolve("/no/such/model", allow_paths=True)


# ---- memory -------------------------------------------------------------------------------------------

def test_estimate_memory_from_the_files(gguf_q4, hf_dir, testdata, monkeypatch):
    from ember.formats.gguf import read_header
    from ember.kernels import native
    from ember.store.memory import native_types, overhead_bytes

    # tiny-llama-Q4_0: 4 layers, hidden 256, FFN 768, 32000-token vocabulary, tied output, Q6_K embedding
    header = read_header(gguf_q4)
    kv_per_token = 2 * 4 * 2 * 32  # K and V, 4 layers, 2 KV heads, head_dim 32: values a token
    matrices = 4 * (2 * 256 * 256 + 2 * 64 * 256 + 3 * 768 * 256)
    q4_file = sum(t.nbytes for t in header.tensors.values() if t.type_name == "Q4_0")  # their blocks in the file
    embedding = header.tensors["token_embd.weight"].nbytes  # Q6_K blocks, kept as they are
    norms = 9 * 256  # 2 per layer + the final one
    # The header (metadata, vocabulary) stays mapped on CPU: the loader parses it through the map the views share.
    head = header.data_offset
    assert head == min(t.offset for t in header.tensors.values()) > 32000 * 8  # mostly the vocabulary

    # The torch backends (a CPU without the native kernels; GPUs): repacks, and the tied output layer a copy.
    monkeypatch.setattr(native, "library", lambda: None)
    assert native_types("cpu") == frozenset()
    est = estimate_memory(gguf_q4, 1024)  # bfloat16 on CPU
    int4 = matrices // 2 + matrices // 32 * 2 * 2  # Q4_0: packed nibbles + a bf16 (scale, zero) pair per 32
    output = 32000 * 256 + 32000 * 256 // 16 * 4  # the tied Q6_K embedding as an int8 output layer
    assert est.weights_bytes == int4 + embedding + output + norms * 2 + head
    assert est.kv_bytes == kv_per_token * 2 * 1024
    assert est.total == est.weights_bytes + est.kv_bytes + est.overhead_bytes > est.overhead_bytes
    # auto = float32 on CPU: 4-byte (scale, zero) pairs, norms and KV cache
    auto = estimate_memory(gguf_q4, 1024, "auto", "cpu")
    assert auto.weights_bytes == matrices // 2 + matrices // 32 * 2 * 4 + embedding + output + norms * 4 + head
    assert auto.kv_bytes == kv_per_token * 4 * 1024
    # a GPU: the same repacks in device memory (no host header), and auto = float16 there, which CUDA's int4
    # kernel does not take: Q4_0 keeps its blocks; MPS has no int4 kernel at all
    cuda = estimate_memory(gguf_q4, 1024, "bfloat16", "cuda:0")
    assert cuda.weights_bytes == int4 + embedding + output + norms * 2
    cuda16 = estimate_memory(gguf_q4, 1024, "auto", "cuda")
    assert cuda16.weights_bytes == q4_file + embedding + output + norms * 2 and cuda16.kv_bytes == est.kv_bytes
    assert estimate_memory(gguf_q4, 1024, "bfloat16", "mps").weights_bytes == cuda16.weights_bytes
    q8 = estimate_memory(testdata / "gguf" / "tiny-llama-Q8_0.gguf", 1024)
    assert q8.weights_bytes > est.weights_bytes and q8.overhead_bytes == est.overhead_bytes

    # The native CPU kernels: every matrix and the embedding are the file's blocks, the tied output free.
    monkeypatch.setattr(native, "library", lambda: object())
    assert "Q4_0" in native_types("cpu") and native_types("cuda") == frozenset()
    nat = estimate_memory(gguf_q4, 1024, "auto", "cpu")
    assert nat.weights_bytes == q4_file + embedding + norms * 4 + head
    assert nat.weights_bytes <= gguf_q4.stat().st_size  # ~ the file itself (q/k are permuted copies of theirs)
    assert nat.kv_bytes == auto.kv_bytes and nat.overhead_bytes == est.overhead_bytes
    assert estimate_memory(gguf_q4, 1024, "bfloat16", "cuda").weights_bytes == cuda.weights_bytes  # GPUs repack
    monkeypatch.setattr(native, "library", lambda: None)

    hf16 = estimate_memory(hf_dir, 1024)
    hf32 = estimate_memory(hf_dir, 1024, dtype="float32")
    raw = (hf_dir / "model.safetensors").read_bytes()
    assert hf16.weights_bytes == len(raw) - 8 - int.from_bytes(raw[:8], "little")  # a bf16 file: its data bytes
    assert hf32.weights_bytes == 2 * hf16.weights_bytes and hf32.kv_bytes == 2 * hf16.kv_bytes
    assert estimate_memory(hf_dir, 1024, "auto", "cpu") == hf32  # auto = float32 on CPU
    assert estimate_memory(hf_dir, 1024, "auto", "cuda") == hf16  # the checkpoint's dtype on a GPU
    from ember.config import config_from_hf, read_config_json

    assert hf16.overhead_bytes == overhead_bytes(config_from_hf(read_config_json(hf_dir), "llama"))

    fixed = est.weights_bytes + est.overhead_bytes
    assert fit_context(gguf_q4, fixed + kv_per_token * 2 * 5000, 4096) == 4096
    assert fit_context(gguf_q4, fixed + kv_per_token * 2 * 1000, 4096) == 768
    with pytest.raises(EmberError, match="256 tokens"):
        fit_context(gguf_q4, fixed + kv_per_token * 2 * 100, 4096)
    cuda_fixed = cuda.weights_bytes + cuda.overhead_bytes
    assert fit_context(gguf_q4, cuda_fixed + kv_per_token * 2 * 1000, 4096, "bfloat16", "cuda") == 768
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        estimate_memory(gguf_q4, 16, dtype="int3")
    with pytest.raises(ModelLoadError, match="unknown device"):
        estimate_memory(gguf_q4, 16, device="tpu")


# ---- CLI ----------------------------------------------------------------------------------------------

def test_cli_ls_show_cp_rm(home, capsys, gguf_q4, hf_dir, tmp_path):
    code, out, _ = cli(capsys, "ls")
    assert code == 0 and "no models" in out
    store = ModelStore()
    store.register("tiny:q4_0", {"tiny-llama-Q4_0.gguf": gguf_q4}, {"type": "huggingface", "repo": "o/r"})
    store.register("tinyhf", {p.name: p for p in hf_dir.iterdir()}, {})

    code, out, _ = cli(capsys, "ls")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "FORMAT", "QUANT", "PARAMS", "MODIFIED"]
    assert lines[1].split()[:7] == ["tiny:q4_0", hashlib.sha256(gguf_q4.read_bytes()).hexdigest()[:12], "9.2", "MB",
                                    "gguf", "Q4_0", "11.2M"]
    assert lines[2].split()[2:7] == ["26.0", "MB", "safetensors", "BF16", "11.2M"]
    code, out, _ = cli(capsys, "ls", "--json")
    assert [row["name"] for row in json.loads(out)] == ["tiny:q4_0", "tinyhf:latest", "ember-default"]
    bundled = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir() if p.is_file())
    row = lines[3].split()
    assert row[:1] + row[2:7] == ["ember-default", *format_size(bundled).split(), "safetensors", "BF16", "3.3M"]

    code, out, _ = cli(capsys, "cp", "tiny:q4_0", "mine")
    assert code == 0 and "mine:latest" in out
    code, out, _ = cli(capsys, "show", "mine")
    assert code == 0
    assert "architecture  llama" in out and "quantization  Q4_0" in out and "context       4096" in out
    assert "tiny-llama-Q4_0.gguf" in out
    assert f"digest        sha256:{hashlib.sha256(gguf_q4.read_bytes()).hexdigest()}" in out
    assert "capabilities  completion" in out
    code, out, _ = cli(capsys, "show", str(hf_dir))
    assert "LlamaForCausalLM" in out and "model.safetensors" in out and "BF16" in out
    assert hashlib.sha256((hf_dir / "model.safetensors").read_bytes()).hexdigest() in out

    code, out, _ = cli(capsys, "rm", "tiny:q4_0", "mine")
    assert code == 0 and "deleted tiny:q4_0" in out and "deleted mine:latest" in out
    code, out, _ = cli(capsys, "ls")
    assert "tiny:q4_0" not in out and "tinyhf:latest" in out
    code, _, err = cli(capsys, "rm", "tiny:q4_0")
    assert code == 1 and err.startswith("error: ") and "not in the store" in err
    code, _, err = cli(capsys, "rm", "ollama/llama3:8b")
    assert code == 1 and "not in ember's store" in err
    code, _, err = cli(capsys, "show", "nothing:here")
    assert code == 1 and err.strip() == "error: model 'nothing:here' not found; try `ember pull nothing:here` " \
                                       "or `ember ls --all`"
    code, _, err = cli(capsys, "cp", "tinyhf", "../x")
    assert code == 1 and "invalid model name" in err and err.count("\n") == 1


def test_cli_cp_rm_refuse_reserved_names(home, capsys, gguf_q4):
    """The built-in and packaged models' names can be neither copied onto nor removed (one-line errors)."""
    store = ModelStore()
    store.register("tiny:q4_0", {"tiny-llama-Q4_0.gguf": gguf_q4})
    for argv in (["cp", "tiny:q4_0", "ember-default"], ["cp", "tiny:q4_0", "ember-default:latest"],
                 ["cp", "tiny:q4_0", "all-minilm"], ["cp", "tiny:q4_0", "sentence-transformers/all-MiniLM-L6-v2"],
                 ["rm", "ember-default"], ["rm", "all-minilm:l6-v2"]):
        code, _, err = cli(capsys, *argv)
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert "cannot be copied onto" in err or "cannot be removed" in err, err
    assert [m.name for m in store.list()] == ["tiny:q4_0"]


def test_cli_show_template_and_license(home, capsys, hf_dir, tmp_path):
    folder = tmp_path / "withtemplate"
    shutil.copytree(hf_dir, folder)
    (folder / "chat_template.jinja").write_text("\n".join(f"line {i}" for i in range(10)))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# model\n")
    code, out, _ = cli(capsys, "show", str(folder))
    assert code == 0 and "license       apache-2.0" in out
    assert "line 5" in out and "line 6" not in out and "4 more lines" in out
    code, out, _ = cli(capsys, "show", str(folder), "--json")
    assert json.loads(out)["template"].startswith("line 0")
    assert os.environ["EMBER_HOME"].startswith(str(home))


# ---- GGUF headers -------------------------------------------------------------------------------------

def _gguf_header(n_tensors: int, n_kv: int, body: bytes = b"", version: int = 3) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + body


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    import struct

    raw = key.encode()
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", vtype) + payload


@pytest.mark.parametrize(("data", "problem"), [
    (b"GGML" + bytes(40), "not a GGUF file"),
    (b"GGUF", "shorter than the 24-byte GGUF header"),
    (_gguf_header(0, 0, version=1), "version 1"),
    (_gguf_header(2**40, 0), "tensor count 1099511627776 cannot fit"),
    (_gguf_header(0, 1, _kv("a", 8, (2**62).to_bytes(8, "little"))), "string value of 'a' is 4611686018427387904 bytes"),
    (_gguf_header(0, 1, _kv("a", 9, (8).to_bytes(4, "little") + (2**60).to_bytes(8, "little"))), "array of 1152921504606846976 elements, over the limit"),
    (_gguf_header(0, 1, _kv("a", 9, (8).to_bytes(4, "little") + (100).to_bytes(8, "little") + bytes(16))),
     "truncated file: array 'a'"),
    (_gguf_header(0, 1, _kv("a", 9, (8).to_bytes(4, "little") + (100).to_bytes(8, "little")
                            + (2**30).to_bytes(8, "little") * 100)), "a string of 1073741824 bytes"),
    (_gguf_header(0, 1, _kv("a", 9, (9).to_bytes(4, "little") + (1).to_bytes(8, "little")
                            + (9).to_bytes(4, "little") + (1).to_bytes(8, "little")
                            + (9).to_bytes(4, "little") + (1).to_bytes(8, "little") + bytes(16))), "nested deeper"),
    (_gguf_header(0, 1, _kv("a", 99, b"\0")), "unknown value type 99"),
    (_gguf_header(0, 3, _kv("a", 4, bytes(4))), "kv count 3 cannot fit"),
])
def test_hostile_gguf_headers(tmp_path, data, problem):
    """The header read of `ember ls`/`show` (arrays skipped) rejects what the loader rejects."""
    from ember.errors import GGUFError
    from ember.formats.gguf import GGUFFile, read_header

    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    for read in (read_header, GGUFFile):
        with pytest.raises(GGUFError, match=problem):
            read(path)


def test_gguf_header_read_matches_the_full_read(testdata):
    from ember.formats.gguf import SMALL_ARRAY, ArrayInfo, GGUFFile, read_header

    for name in ("tiny-llama-Q4_K_M.gguf", "tiny-llama-bf16.gguf"):
        header = read_header(testdata / "gguf" / name)
        with GGUFFile(testdata / "gguf" / name) as f:
            assert header.tensors == f.tensors and header.data_offset == f.data_offset
            assert header.metadata.keys() == f.metadata.keys()
            for key, value in header.metadata.items():
                full = f.metadata[key]
                if isinstance(value, ArrayInfo):
                    assert len(full) == value.count > SMALL_ARRAY
                else:
                    assert value == full
            assert header.metadata["tokenizer.ggml.tokens"] == ArrayInfo(8, 32000)
            assert (header.quant, header.architecture, header.arch_key("block_count")) == (
                f.quant, "llama", f.metadata["llama.block_count"])
            assert header.weights_bytes == sum(t.nbytes for t in f.tensors.values())
    with pytest.raises(GGUFError, match="file is closed"):
        header.raw("output_norm.weight")
    with pytest.raises(ValueError, match="arrays must be"):
        GGUFFile(testdata / "gguf" / "tiny-llama-Q4_K_M.gguf", arrays="lazy")


def test_listing_a_gguf_imports_no_torch(testdata):
    code = ("import sys; from ember.store.info import describe_path; from ember.store.memory import estimate_memory;"
            f"from pathlib import Path; p = Path({str(testdata / 'gguf' / 'tiny-llama-Q4_0.gguf')!r});"
            "describe_path(p); estimate_memory(p, 256); estimate_memory(p, 256, 'auto', 'cpu');"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_catalog_lists_store_then_discovered(home, gguf_q4, tmp_path, monkeypatch):
    from ember.store.catalog import list_models

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copyfile(gguf_q4, folder / "tiny-Q4_0.gguf")
    (folder / "broken-Q5_K_M.gguf").write_bytes(b"GGUF" + bytes(30))
    monkeypatch.setenv("EMBER_MODELS_PATH", str(folder))
    ModelStore().register("tiny", {"t.gguf": gguf_q4}, {"type": "huggingface", "repo": "o/r"})
    entries = list_models(include_discovered=True)
    assert [(e.name, e.source, e.quant) for e in entries] == [
        ("tiny:latest", "store", "Q4_0"), ("ember-default", "default", "BF16"),
        ("local/broken-Q5_K_M", "local", "Q5_K_M"), ("local/tiny-Q4_0", "local", "Q4_0")]
    assert entries[0].origin == "o/r" and entries[3].parameters == entries[0].parameters > 0
    assert entries[2].parameters is None  # listed even though its header is unreadable
    assert [e.name for e in list_models()] == ["tiny:latest", "ember-default"]
