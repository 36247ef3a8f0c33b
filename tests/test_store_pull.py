"""`ember pull` against a fake Hugging Face (HfApi.model_info and hf_hub_download serve local files)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest

from ember.errors import ModelLoadError
from ember.store.pull import pull
from ember.store.resolve import resolve
from ember.store.store import ModelStore
from tests.test_store import cli, home  # noqa: F401  (fixture)

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


class RepositoryNotFoundError(Exception):
    pass


class FakeHub:
    """Repos of local files; records downloads; can corrupt or fail a download."""

    def __init__(self, cache: Path):
        self.cache = cache
        self.repos: dict[str, dict[str, Path]] = {}
        self.downloads: list[str] = []
        self.corrupt: set[str] = set()
        self.fail_after: int | None = None  # interrupt the download after this many files
        self.no_lfs: set[str] = set()

    def add(self, repo: str, files: dict[str, Path]) -> None:
        self.repos[repo] = files

    def model_info(self, repo_id, revision=None, files_metadata=False, **_):
        if repo_id not in self.repos:
            raise RepositoryNotFoundError(f"404 Client Error: {repo_id} not found")
        siblings = []
        for name, path in self.repos[repo_id].items():
            lfs = None
            if path.suffix in (".gguf", ".safetensors") and name not in self.no_lfs:
                lfs = SimpleNamespace(sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                                      size=path.stat().st_size, pointer_size=130)
            siblings.append(SimpleNamespace(rfilename=name, size=path.stat().st_size, lfs=lfs))
        return SimpleNamespace(id=repo_id, sha=COMMIT, siblings=siblings)

    def hf_hub_download(self, repo_id, filename, *, revision=None, **_):
        assert revision == COMMIT
        if self.fail_after is not None and len(self.downloads) >= self.fail_after:
            raise KeyboardInterrupt
        self.downloads.append(filename)
        out = self.cache / repo_id.replace("/", "--") / revision / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        data = self.repos[repo_id][filename].read_bytes()
        if filename in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        out.write_bytes(data)
        return str(out)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tests must not reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub(home, tmp_path, testdata, monkeypatch):  # noqa: F811
    fake = FakeHub(tmp_path / "downloads")
    gguf = testdata / "gguf"
    readme = tmp_path / "README.md"
    readme.write_text("---\nlicense: apache-2.0\nbase_model: someorg/tiny\n---\n# Tiny\n")
    fake.add("someorg/Tiny-GGUF", {
        "README.md": readme,
        "tiny-llama-Q4_0.gguf": gguf / "tiny-llama-Q4_0.gguf",
        "tiny-llama-Q4_K_M.gguf": gguf / "tiny-llama-Q4_K_M.gguf",
        "tiny-llama-Q8_0.gguf": gguf / "tiny-llama-Q8_0.gguf",
        "mmproj-tiny-f16.gguf": gguf / "tiny-llama-Q4_0.gguf",
    })
    fake.add("someorg/NoKM-GGUF", {"sub/tiny-Q8_0.gguf": gguf / "tiny-llama-Q8_0.gguf",
                                   "tiny-Q4_0.gguf": gguf / "tiny-llama-Q4_0.gguf",
                                   "tiny-Q4_K_S.gguf": gguf / "tiny-llama-Q4_K_M.gguf"})
    hf = gguf / "tiny-llama-hf"
    fake.add("someorg/tiny-hf", {**{p.name: p for p in hf.iterdir()}, ".gitattributes": hf / "config.json",
                                 "onnx/model.onnx": hf / "config.json", "pytorch_model.bin": hf / "config.json"})
    fake.add("someorg/empty", {"README.md": Path(testdata / "README.md")})
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: fake)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    return fake


def empty_store(store: ModelStore) -> bool:
    return (store.list() == [] and not any(store.blobs.glob("*")) and not any(store.tmp.glob("*")))


def test_pull_gguf_default_quant(hub, testdata):
    manifest = pull("someorg/Tiny-GGUF", progress=False)
    assert manifest.name == "tiny-gguf:q4_k_m" and manifest.format == "gguf"
    assert hub.downloads == ["tiny-llama-Q4_K_M.gguf", "README.md"]
    assert manifest.source == {"type": "huggingface", "repo": "someorg/Tiny-GGUF", "revision": COMMIT,
                               "format": "gguf", "file": "tiny-llama-Q4_K_M.gguf", "quant": "Q4_K_M"}
    store = ModelStore()
    path = store.path_for("tiny-gguf:q4_k_m")
    assert path.read_bytes() == (testdata / "gguf" / "tiny-llama-Q4_K_M.gguf").read_bytes()
    for ref in ("tiny-gguf:q4_k_m", "someorg/Tiny-GGUF", "someorg/tiny-gguf:Q4_K_M", "hf.co/someorg/Tiny-GGUF"):
        r = resolve(ref, allow_paths=False)
        assert (r.name, r.path, r.source) == ("tiny-gguf:q4_k_m", path, "store"), ref


@pytest.mark.parametrize(("ref", "file", "name"), [
    ("someorg/Tiny-GGUF:q8_0", "tiny-llama-Q8_0.gguf", "tiny-gguf:q8_0"),
    ("someorg/Tiny-GGUF:tiny-llama-Q4_0.gguf", "tiny-llama-Q4_0.gguf", "tiny-gguf:q4_0"),
    ("hf.co/someorg/Tiny-GGUF:Q4_0", "tiny-llama-Q4_0.gguf", "tiny-gguf:q4_0"),
    ("someorg/NoKM-GGUF", "tiny-Q4_0.gguf", "nokm-gguf:q4_0"),  # no Q4_K_M: the smallest Q4
    ("someorg/NoKM-GGUF:Q8_0", "sub/tiny-Q8_0.gguf", "nokm-gguf:q8_0"),
])
def test_pull_picks_the_file(hub, ref, file, name):
    manifest = pull(ref, progress=False)
    assert hub.downloads[0] == file and set(hub.downloads[1:]) <= {"README.md"} and manifest.name == name
    assert [f for f in manifest.files if f.endswith(".gguf")] == [file.rsplit("/", 1)[-1]]


@pytest.mark.parametrize(("ref", "message"), [
    ("someorg/Tiny-GGUF:Q5_K_M", "has no Q5_K_M GGUF; available: Q4_0, Q4_K_M, Q8_0"),
    ("someorg/Tiny-GGUF:Q4", "ambiguous"),
    ("someorg/Tiny-GGUF:nope.gguf", "has no file 'nope.gguf'"),
    ("someorg/tiny-hf:Q4_0", "has no GGUF files"),
    ("someorg/empty", "neither GGUF files nor a safetensors checkpoint"),
    ("someorg/missing", "cannot list Hugging Face repo 'someorg/missing': RepositoryNotFoundError"),
    ("tiny", "needs a Hugging Face repo id"),
    ("../x", "invalid model name"),
])
def test_pull_errors(hub, ref, message):
    with pytest.raises(ModelLoadError, match=message.replace("(", r"\(")):
        pull(ref, progress=False)
    assert hub.downloads == [] and empty_store(ModelStore())


def test_pull_checkpoint(hub, testdata):
    manifest = pull("someorg/tiny-hf", progress=False)
    assert manifest.name == "tiny-hf:latest" and manifest.format == "safetensors"
    hf = testdata / "gguf" / "tiny-llama-hf"
    assert sorted(hub.downloads) == sorted(p.name for p in hf.iterdir())
    folder = resolve("someorg/tiny-hf", allow_paths=False).path
    assert folder == ModelStore().path_for("tiny-hf") and (folder / "config.json").is_file()
    assert (folder / "model.safetensors").stat().st_size == (hf / "model.safetensors").stat().st_size


def test_checksum_mismatch_registers_nothing(hub):
    hub.corrupt.add("tiny-llama-Q4_K_M.gguf")
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        pull("someorg/Tiny-GGUF", progress=False)
    assert empty_store(ModelStore())
    hub.corrupt = {"model.safetensors"}
    with pytest.raises(ModelLoadError, match="model.safetensors: checksum mismatch"):
        pull("someorg/tiny-hf", progress=False)
    assert empty_store(ModelStore())


def test_size_checked_without_lfs_hash(hub):
    hub.no_lfs.add("tiny-llama-Q4_K_M.gguf")
    hub.corrupt.add("tiny-llama-Q4_K_M.gguf")
    assert pull("someorg/Tiny-GGUF", progress=False).name == "tiny-gguf:q4_k_m"  # same size, no hash to check


def test_interrupted_pull_registers_nothing(hub):
    hub.fail_after = 3
    with pytest.raises(KeyboardInterrupt):
        pull("someorg/tiny-hf", progress=False)
    assert len(hub.downloads) == 3  # three files had been added before the interruption
    assert empty_store(ModelStore())
    hub.fail_after = None
    pull("someorg/Tiny-GGUF:Q8_0", progress=False)
    hub.fail_after, hub.downloads = 2, []
    with pytest.raises(KeyboardInterrupt):
        pull("someorg/tiny-hf", progress=False)
    store = ModelStore()
    assert [m.name for m in store.list()] == ["tiny-gguf:q8_0"] and len(list(store.blobs.iterdir())) == 2  # + README


def test_cli_pull(hub, capsys):
    code, out, err = cli(capsys, "pull", "someorg/Tiny-GGUF:Q8_0", "--name", "mine:q8", "-q")
    assert (code, out, err) == (0, "mine:q8\n", "")
    code, out, err = cli(capsys, "pull", "someorg/tiny-hf")
    assert code == 0 and out == "tiny-hf:latest\n" and "pulling someorg/tiny-hf@fedcba987654" in err
    code, out, _ = cli(capsys, "ls")
    assert "mine:q8" in out and "tiny-hf:latest" in out
    code, out, _ = cli(capsys, "show", "mine:q8")
    assert "license       apache-2.0" in out and "quantization  Q8_0" in out and "README.md" in out
    assert "origin        hf.co/someorg/Tiny-GGUF@fedcba987654" in out
    code, _, err = cli(capsys, "pull", "someorg/Tiny-GGUF:Q5_K_M")
    assert code == 1 and err.startswith("error: someorg/Tiny-GGUF has no Q5_K_M GGUF") and err.count("\n") == 1
    code, _, err = cli(capsys, "pull", "someorg/Tiny-GGUF", "--name", "bad/name")
    assert code == 1 and "invalid model name" in err


def test_pull_again_replaces_and_collects(hub, testdata):
    first = pull("someorg/Tiny-GGUF:Q8_0", name="tiny:latest", progress=False)
    old = first.files["tiny-llama-Q8_0.gguf"].digest
    second = pull("someorg/Tiny-GGUF:Q4_0", name="tiny", progress=False)
    store = ModelStore()
    assert [m.name for m in store.list()] == ["tiny:latest"] and second.details["quant"] == "Q4_0"
    assert not store.blob_path(old).exists()
    assert store.path_for("tiny").name == "tiny-llama-Q4_0.gguf"
    assert len(list(store.blobs.iterdir())) == 2  # the GGUF and the README
