"""Discovery of models other tools downloaded (HF cache, Ollama, LM Studio, EMBER_MODELS_PATH), in a fake HOME."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from ember.errors import ModelLoadError
from ember.store.discovery import discover_all
from ember.store.resolve import resolve
from tests.test_store import cli, home  # noqa: F401  (fixture)

REV = "0123456789abcdef0123456789abcdef01234567"
TEMPLATE = "{{ if .System }}<|system|>{{ .System }}{{ end }}\n<|user|>{{ .Prompt }}\n<|assistant|>"


def place(src: Path, dst: Path) -> Path:
    """A private copy (hard link when possible: the fixtures are read-only and never changed)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def layout(home, testdata, tmp_path, monkeypatch):  # noqa: F811
    gguf = testdata / "gguf"
    q4 = gguf / "tiny-llama-Q4_0.gguf"
    hf_dir = gguf / "tiny-llama-hf"

    # Hugging Face cache: a GGUF repo and a checkpoint repo; snapshot files link to blobs like the real cache
    hub = home / ".cache" / "huggingface" / "hub"
    repo = hub / "models--someorg--Tiny-GGUF"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    for name in ("tiny-llama-Q4_0.gguf", "tiny-llama-Q6_K.gguf"):
        blob = place(gguf / name, repo / "blobs" / sha256(gguf / name))
        link = repo / "snapshots" / REV / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "snapshots" / REV / "mmproj-tiny-F16.gguf").write_bytes(b"GGUF")  # projector: not a model
    ckpt = hub / "models--someorg--tiny-hf" / "snapshots" / REV
    for f in hf_dir.iterdir():
        place(f, ckpt / f.name)
    (hub / "models--broken").mkdir()
    (hub / "datasets--x--y").mkdir()

    # Ollama (default folder under HOME): library model with a template, a user namespace model, junk
    ollama = home / ".ollama" / "models"
    digest = sha256(q4)
    place(q4, ollama / "blobs" / f"sha256-{digest}")
    tpl = ollama / "blobs" / f"sha256-{hashlib.sha256(TEMPLATE.encode()).hexdigest()}"
    tpl.write_text(TEMPLATE)
    config = ollama / "blobs" / f"sha256-{'c' * 64}"
    config.write_text("{}")

    def manifest(path: Path, layers: list) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"schemaVersion": 2, "config": {"digest": f"sha256:{'c' * 64}"},
                                    "layers": layers}))

    model_layer = {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
                   "size": q4.stat().st_size}
    tpl_layer = {"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{tpl.name[7:]}"}
    reg = ollama / "manifests" / "registry.ollama.ai"
    manifest(reg / "library" / "tiny" / "q4", [model_layer, tpl_layer])
    manifest(reg / "someone" / "tiny2" / "latest", [model_layer])
    manifest(reg / "library" / "missing" / "latest",
             [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{'d' * 64}"}])
    manifest(reg / "library" / "evil" / "latest",
             [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:../../../../etc/passwd"}])
    (reg / "library" / "garbage").mkdir()
    (reg / "library" / "garbage" / "latest").write_text("not json{")

    # LM Studio: current and legacy folders; a symlink leaving the root is ignored
    place(gguf / "tiny-llama-Q8_0.gguf", home / ".lmstudio" / "models" / "pub" / "Tiny-GGUF" / "tiny-llama-Q8_0.gguf")
    place(q4, home / ".cache" / "lm-studio" / "models" / "old" / "repo" / "tiny-llama-Q4_0.gguf")
    (home / ".lmstudio" / "models" / "pub" / "escape").symlink_to(gguf, target_is_directory=True)

    # EMBER_MODELS_PATH: a GGUF and a checkpoint folder, plus a folder that does not exist
    local = tmp_path / "mymodels"
    place(gguf / "tiny-llama-Q4_K_M.gguf", local / "tiny-llama-Q4_K_M.gguf")
    for f in hf_dir.iterdir():
        place(f, local / "tiny-hf" / f.name)
    (local / "not-a-model").mkdir()
    (local / "escape.gguf").symlink_to(q4)
    monkeypatch.setenv("EMBER_MODELS_PATH", os.pathsep.join([str(local), str(tmp_path / "nowhere")]))
    return {"home": home, "hub": hub, "ollama": ollama, "local": local, "q4": q4, "digest": digest}


EXPECTED = {
    "hf.co/someorg/Tiny-GGUF:tiny-llama-Q4_0": ("gguf", "huggingface", "Q4_0"),
    "hf.co/someorg/Tiny-GGUF:tiny-llama-Q6_K": ("gguf", "huggingface", "Q6_K"),
    "hf.co/someorg/tiny-hf": ("safetensors", "huggingface", "BF16"),
    "ollama/tiny:q4": ("gguf", "ollama", "Q4_0"),
    "ollama/someone/tiny2:latest": ("gguf", "ollama", "Q4_0"),
    "lmstudio/pub/Tiny-GGUF/tiny-llama-Q8_0.gguf": ("gguf", "lmstudio", "Q8_0"),
    "lmstudio/old/repo/tiny-llama-Q4_0.gguf": ("gguf", "lmstudio", "Q4_0"),
    "local/tiny-llama-Q4_K_M": ("gguf", "local", "Q4_K_M"),
    "local/tiny-hf": ("safetensors", "local", "BF16"),
}


def test_discover_all(layout):
    found = {m.name: m for m in discover_all()}
    assert sorted(found) == sorted(EXPECTED)
    tiny = found["ollama/tiny:q4"]
    assert tiny.path == layout["ollama"] / "blobs" / f"sha256-{layout['digest']}"
    assert tiny.template == TEMPLATE and tiny.size == layout["q4"].stat().st_size
    assert found["ollama/someone/tiny2:latest"].template is None
    assert found["hf.co/someorg/tiny-hf"].path == layout["hub"] / "models--someorg--tiny-hf" / "snapshots" / REV
    assert found["local/tiny-hf"].format == "safetensors"


def test_ls_all(layout, capsys):
    code, out, _ = cli(capsys, "ls", "--all")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "FORMAT", "QUANT", "PARAMS", "MODIFIED", "SOURCE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows.pop("ember-default")[-1] == "default"  # the bundled model, there on a fresh machine too
    assert sorted(rows) == sorted(EXPECTED)
    for name, (fmt, source, quant) in EXPECTED.items():
        assert rows[name][4:7] == [fmt, quant, "11.2M"], name
        assert rows[name][-1] == source
    code, out, _ = cli(capsys, "ls", "--all", "--json")
    listed = {r["name"]: r for r in json.loads(out)}
    assert set(listed) == {*EXPECTED, "ember-default"}
    assert listed["ollama/tiny:q4"]["digest"] == layout["digest"]  # the sha256 of the file, as Ollama's ID
    assert rows["ollama/tiny:q4"][1] == layout["digest"][:12]
    code, out, _ = cli(capsys, "ls")
    assert "ollama/" not in out and "no models" in out


def test_resolve_discovered_names(layout):
    for name, (fmt, source, _) in EXPECTED.items():
        r = resolve(name, allow_paths=False)
        assert (r.name, r.format, r.source) == (name, fmt, source)
        assert r.path.exists()
        if fmt == "gguf":
            assert r.path.read_bytes()[:4] == b"GGUF"
    r = resolve("ollama/tiny:q4", allow_paths=False)
    assert r.path == layout["ollama"] / "blobs" / f"sha256-{layout['digest']}"
    # HF repo ids find the cache: a quantization tag, a file name, a checkpoint repo
    assert resolve("someorg/Tiny-GGUF:Q6_K", allow_paths=False).name == "hf.co/someorg/Tiny-GGUF:tiny-llama-Q6_K"
    assert resolve("someorg/tiny-gguf:tiny-llama-Q4_0.gguf", allow_paths=False).format == "gguf"
    assert resolve("someorg/tiny-hf", allow_paths=False).path.name == REV
    with pytest.raises(ModelLoadError, match="several cached models"):
        resolve("someorg/Tiny-GGUF", allow_paths=False)
    for missing in ("ollama/missing:latest", "ollama/evil:latest", "ollama/garbage:latest",
                    "lmstudio/pub/escape/tiny-llama-Q4_0.gguf", "local/escape", "local/not-a-model",
                    "someorg/Tiny-GGUF:Q8_0"):
        with pytest.raises(ModelLoadError, match=r"not found; try `ember pull"):
            resolve(missing, allow_paths=False)
    assert resolve("local/tiny-hf", allow_paths=False).path == layout["local"] / "tiny-hf"


def test_show_discovered(layout, capsys):
    code, out, _ = cli(capsys, "show", "ollama/tiny:q4")
    assert code == 0 and "source        ollama" in out and "quantization  Q4_0" in out
    assert "template (go (ollama)):" in out and "<|user|>{{ .Prompt }}" in out
    code, out, _ = cli(capsys, "show", "hf.co/someorg/tiny-hf")
    assert "LlamaForCausalLM" in out and "config.json" in out
    code, _, err = cli(capsys, "rm", "ollama/tiny:q4")
    assert code == 1 and "not in ember's store" in err
    assert (layout["ollama"] / "blobs" / f"sha256-{layout['digest']}").exists()


def test_ollama_models_env_and_unreadable(layout, monkeypatch, tmp_path):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nohub"))
    names = {m.name for m in discover_all()}
    assert not any(n.startswith(("ollama/", "hf.co/")) for n in names)
    monkeypatch.setenv("OLLAMA_MODELS", str(layout["ollama"]))
    if os.geteuid() != 0:  # root reads everything
        locked = layout["ollama"] / "manifests" / "registry.ollama.ai" / "someone"
        locked.chmod(0)
        try:
            assert "ollama/tiny:q4" in {m.name for m in discover_all()}
        finally:
            locked.chmod(0o755)
    assert "ollama/tiny:q4" in {m.name for m in discover_all()}


def test_ls_all_on_a_fresh_machine(home, capsys):  # noqa: F811
    code, out, _ = cli(capsys, "ls", "--all")
    assert code == 0 and "ember-default" in out and "no models but the bundled one" in out


def test_bare_names_fall_back_to_ollama(layout, capsys, caplog):
    """`ember run llama3.2` as Ollama users type it: not in ember's store, found in Ollama's, said as a warning
    (the CLI's logging prints it on stderr)."""
    r = resolve("tiny:q4", allow_paths=False)
    assert (r.name, r.source) == ("ollama/tiny:q4", "ollama")
    assert resolve("ollama/someone/tiny2", allow_paths=False).name == "ollama/someone/tiny2:latest"
    code, out, _ = cli(capsys, "run", "tiny:q4", "--max-tokens", "2", "--temperature", "0", "hello")
    assert code == 0 and out.strip()
    assert "tiny:q4 is not in ember's store; using Ollama's ollama/tiny:q4" in caplog.text
    with pytest.raises(ModelLoadError, match="not found"):
        resolve("missing", allow_paths=False)
