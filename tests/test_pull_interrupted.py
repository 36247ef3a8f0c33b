"""`ember pull` as a real process against a Hugging Face over HTTP on 127.0.0.1 (tests/fake_hf_server.py):
killed with SIGKILL mid-download, then pulled again; two pulls of one model at once; a disk that fills up."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember.errors import ModelLoadError
from ember.store.store import ModelStore
from tests.fake_hf_server import FakeHFServer

FILE = "tiny-llama-Q4_0.gguf"
REPO = "someorg/Tiny-GGUF"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def hub(testdata):
    with FakeHFServer({REPO: {FILE: testdata / "gguf" / FILE}}) as server:
        yield server


def _env(hub: FakeHFServer, hf_home: Path, ember_home: Path) -> dict[str, str]:
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "EMBER_HOME": str(ember_home),
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
            "PYTHONPATH": str(ROOT)}


PULL = [sys.executable, "-m", "ember.cli.main", "pull", REPO, "-q"]


def _pull(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(PULL, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _stored_ok(ember_home: Path, hub: FakeHFServer, testdata: Path) -> None:
    """Exactly one model, whose file is the hub's file byte for byte, and no partial files in the store."""
    store = ModelStore(ember_home)
    assert [m.name for m in store.list()] == ["tiny-gguf:q4_0"]
    path = store.path_for("tiny-gguf:q4_0")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hub.sha256(testdata / "gguf" / FILE)
    assert len(list(store.blobs.iterdir())) == 1 and not any(store.tmp.iterdir())


def _partials(hf_home: Path) -> list[Path]:
    return list(hf_home.rglob("*.incomplete"))


def test_killed_pull_registers_nothing_and_the_next_pull_completes(hub, tmp_path, testdata):
    """SIGKILL during the download: nothing is registered; pulling again downloads the file anew (huggingface_hub
    1.x keeps each download in a process-private temporary file, so it restarts rather than resumes), checks
    its SHA-256 against the hub's and deletes the killed pull's abandoned partial file."""
    env = _env(hub, tmp_path / "hf", tmp_path / "ember")
    hub.seconds_per_chunk = 0.02  # 140 chunks: about 3 s for the file
    first = _pull(env)
    try:
        _wait_for(lambda: hub.bytes_sent.get(FILE, 0) > 1_000_000, "the download to start")
    finally:
        first.kill()
        first.wait(timeout=30)
    assert first.returncode == -9
    store = ModelStore(tmp_path / "ember")
    assert store.list() == [] and not (store.blobs.exists() and any(store.blobs.iterdir()))
    assert len(_partials(tmp_path / "hf")) == 1  # what the killed download left

    hub.seconds_per_chunk = 0.0
    second = subprocess.run(PULL, env=env, capture_output=True, text=True, timeout=120)
    assert (second.returncode, second.stdout, second.stderr) == (0, "tiny-gguf:q4_0\n", "")
    _stored_ok(tmp_path / "ember", hub, testdata)
    assert hub.downloads_of(FILE) == [None, None]  # whole file both times
    assert _partials(tmp_path / "hf") == []


def test_two_pulls_at_once_leave_one_good_copy(hub, tmp_path, testdata):
    """Two processes pull the same model together: huggingface_hub's lock makes the second wait for the first's
    download (fetched once), both register the same manifest, and the store holds one copy."""
    env = _env(hub, tmp_path / "hf", tmp_path / "ember")
    hub.seconds_per_chunk = 0.005
    pulls = [_pull(env), _pull(env)]
    outputs = [p.communicate(timeout=120) for p in pulls]
    assert [p.returncode for p in pulls] == [0, 0], outputs
    assert [out for out, _ in outputs] == ["tiny-gguf:q4_0\n"] * 2
    _stored_ok(tmp_path / "ember", hub, testdata)
    assert hub.downloads_of(FILE) == [None]
    assert _partials(tmp_path / "hf") == []


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs (the model file is 9 MB), or a skip where mounting one is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); test_store_full_in_process covers the store side")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("where", ["cache", "store"])
def test_pull_that_cannot_fit_is_refused_before_downloading(hub, tmp_path, small_disk, where):
    """The Hugging Face cache on the small disk, or only the store (then files are copied, not hard-linked): one
    line saying how much is needed and free where, nothing downloaded, nothing registered."""
    hf_home = small_disk / "hf" if where == "cache" else tmp_path / "hf"
    result = subprocess.run(PULL, env=_env(hub, hf_home, small_disk / "ember"), capture_output=True, text=True,
                            timeout=120)
    place = small_disk  # the nearest folder that exists (hf/ and ember/ are not made yet)
    assert (result.returncode, result.stdout) == (1, "")
    assert re.fullmatch(rf"error: not enough disk space to pull {REPO}: 9\.2 MB needed in {re.escape(str(place))}, "
                        r"4\.\d MB free\n", result.stderr), result.stderr
    assert hub.downloads_of(FILE) == []
    assert ModelStore(small_disk / "ember").list() == []


def test_disk_filling_up_during_the_download(hub, tmp_path, small_disk, testdata):
    """The hub lists the file as 1 MB, so the space check passes, and the disk fills while 9 MB arrive: exit 1,
    one line naming the cause, nothing registered, no partial file left on the full disk."""
    hub.listed_sizes[FILE] = 1_000_000
    env = _env(hub, small_disk / "hf", small_disk / "ember")
    result = subprocess.run(PULL, env=env, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"error: download of {REPO}/{FILE} failed: OSError: [Errno 28] No space left on "
                             "device\n"), result.stderr
    store = ModelStore(small_disk / "ember")
    assert store.list() == [] and not any(store.blobs.glob("*")) and not any(store.tmp.glob("*"))
    assert _partials(small_disk) == []
    used = sum(p.stat().st_size for p in small_disk.rglob("*") if p.is_file() and not p.is_symlink())
    assert used < 64 * 1024  # lock files and empty folders only


def test_store_full_in_process(tmp_path, testdata, monkeypatch):
    """Where no tmpfs can be mounted: ENOSPC from the store's copy (injected) is a one-line ModelLoadError from
    pull, and the store keeps nothing."""
    import ember.store.store as store_module
    from tests.test_store_pull import COMMIT, FakeHub  # the in-process fake Hugging Face

    fake = FakeHub(tmp_path / "downloads")
    fake.add(REPO, {FILE: testdata / "gguf" / FILE})
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: fake)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "ember"))
    real_copy = store_module._copy_hashing

    def full_disk(source, fd):
        os.write(fd, b"x" * 4096)  # a partial blob exists when the disk fills
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module, "_copy_hashing", full_disk)
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EXDEV, "cross-device")))
    from ember.store.pull import pull

    store = ModelStore(tmp_path / "ember")
    with pytest.raises(ModelLoadError, match=f"^cannot store {FILE} in .*: No space left on device$"):
        pull(REPO, store, progress=False)
    assert store.list() == [] and not any(store.blobs.iterdir()) and not any(store.tmp.iterdir())
    monkeypatch.setattr(store_module, "_copy_hashing", real_copy)
    assert pull(REPO, store, progress=False).name == "tiny-gguf:q4_0" and COMMIT
