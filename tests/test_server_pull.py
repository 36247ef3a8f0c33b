"""/api/pull with the official ollama client, against the fake Hugging Face of test_store_pull (local files):
the stream reports the file's real digest and size, and the verification it announces really happens."""

from __future__ import annotations

import hashlib
import ipaddress
import socket

import ollama
import pytest

from tests.server_helpers import ThreadedServer
from tests.test_store import home  # noqa: F401  (fixture)
from tests.test_store_pull import hub  # noqa: F401  (fixture)

CONNECT, CREATE_CONNECTION = socket.socket.connect, socket.create_connection


def _loopback(address) -> bool:
    return ipaddress.ip_address(address[0]).is_loopback


@pytest.fixture(autouse=True)
def loopback_only(home, monkeypatch):  # noqa: F811
    """`home` refuses every connection; the client here must reach the server on 127.0.0.1, nothing else."""
    def connect(self, address):
        assert self.family not in (socket.AF_INET, socket.AF_INET6) or _loopback(address), "network access"
        return CONNECT(self, address)

    def create_connection(address, *args, **kwargs):
        assert _loopback(address), "tests must not reach the network"
        return CREATE_CONNECTION(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)


@pytest.fixture
def server(hub):  # noqa: F811
    from ember.server.pool import ModelPool
    from ember.server.state import ServerState, Settings

    with ThreadedServer(lambda port: ServerState(Settings(port=port), pool=ModelPool(
            max_memory=2**30, preload=False))) as running:
        yield running


def test_pull_stream_reports_digest_progress_and_verification(server, testdata):
    path = testdata / "gguf" / "tiny-llama-Q4_K_M.gguf"
    digest = f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    events = [e.model_dump(exclude_none=True) for e in ollama.Client(host=server.url).pull(
        "someorg/Tiny-GGUF", stream=True)]
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    progress = [e for e in events if e.get("digest") == digest and "completed" in e]
    assert [(e["total"], e["completed"]) for e in progress] == [(path.stat().st_size, 0)] * 1 + [
        (path.stat().st_size, path.stat().st_size)]
    verify = statuses.index("verifying sha256 digest")
    assert statuses.index(progress[-1]["status"]) < verify < statuses.index("writing manifest")
    shown = ollama.Client(host=server.url).show("tiny-gguf:q4_k_m")
    assert shown.details.quantization_level == "Q4_K_M"
    tags = ollama.Client(host=server.url).list().models
    assert [t.digest for t in tags if t.model == "tiny-gguf:q4_k_m"] == [digest.removeprefix("sha256:")]


def test_pull_corrupt_download_is_an_error_event(server, hub):  # noqa: F811
    hub.corrupt.add("tiny-llama-Q4_K_M.gguf")
    with pytest.raises(ollama.ResponseError) as err:
        list(ollama.Client(host=server.url).pull("someorg/Tiny-GGUF", stream=True))
    assert "checksum mismatch" in str(err.value)
