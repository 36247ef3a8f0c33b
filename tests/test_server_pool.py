"""The server's model pool: any discovered model by name, loaded once on first use, kept for keep_alive, evicted
least-recently-used when memory is short (never while busy), context fitted to the budget; `ember ps`/`stop`."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ember.server import pool as pool_module
from ember.server.keep_alive import parse_keep_alive
from ember.server.pool import ModelPool, load_engine
from ember.server.state import ServerState, Settings
from ember.store.memory import estimate_memory
from tests.server_helpers import ThreadedServer, make_tiny_chat_model, start_server

ENGINE_ARGS = {"dtype": "float32", "max_num_seqs": 4}
GEN = {"stream": False, "options": {"num_predict": 2, "temperature": 0}}


@pytest.fixture(scope="module")
def models(tmp_path_factory, testdata):
    """$EMBER_MODELS_PATH with local/alpha, local/beta (checkpoint folders) and local/q8 (a GGUF); nothing else
    discoverable (empty store, HF cache, Ollama)."""
    root = tmp_path_factory.mktemp("pool")
    folder = root / "models"
    make_tiny_chat_model(folder / "alpha", testdata)
    shutil.copytree(folder / "alpha", folder / "beta")
    shutil.copyfile(testdata / "gguf" / "tiny-llama-Q8_0.gguf", folder / "q8.gguf")
    with pytest.MonkeyPatch.context() as mp:
        for var, value in (("EMBER_MODELS_PATH", folder), ("EMBER_HOME", root / "home"), ("HOME", root),
                           ("HF_HUB_CACHE", root / "hf"), ("OLLAMA_MODELS", root / "ollama")):
            mp.setenv(var, str(value))
        mp.setattr(pool_module, "REAP_INTERVAL", 0.1)
        yield folder


def full_size(path: Path) -> int:
    return estimate_memory(path, 4096, "float32").total


class Served(ThreadedServer):
    """The app on uvicorn in a thread (real streaming), with a pool built by the test."""

    def __init__(self, pool: ModelPool):
        self.pool = pool
        super().__init__(lambda port: ServerState(Settings(host="127.0.0.1", port=port), pool=pool))

    def generate(self, model: str, **extra) -> httpx.Response:
        return httpx.post(f"{self.url}/api/generate", json={"model": model, "prompt": "Hi", **GEN, **extra},
                          timeout=60)

    def ps(self) -> list[dict]:
        return httpx.get(f"{self.url}/api/ps").json()["models"]

    def loaded(self) -> list[str]:
        return sorted(m["name"] for m in self.ps())


def test_keep_alive_parsing():
    assert parse_keep_alive(None) == 300 and parse_keep_alive("") == 300
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400 and parse_keep_alive("30s") == 30
    assert parse_keep_alive(0) == 0 and parse_keep_alive("0") == 0 and parse_keep_alive(12.5) == 12.5
    assert parse_keep_alive(-1) is None and parse_keep_alive("-5m") is None
    # Past a century is forever: 1e308 s (or JSON's Infinity) used to be kept as is, and /api/ps then failed
    # with a 500 (no date that far) for as long as the model stayed loaded.
    assert parse_keep_alive("99999999999999h") is None and parse_keep_alive(1e308) is None
    assert parse_keep_alive(float("inf")) is None and parse_keep_alive("8760h") == 365 * 86400
    for bad in ("soon", "5x", "m5", True):
        with pytest.raises(Exception, match="keep_alive"):
            parse_keep_alive(bad)


def test_names_load_once_and_keep_alive(models):
    calls = []

    def slow_loader(resolved, args):
        calls.append(resolved.name)
        time.sleep(0.5)  # both first requests arrive while the load runs
        return load_engine(resolved, args)

    with Served(ModelPool(ENGINE_ARGS, max_memory=2**40, loader=slow_loader)) as srv:
        with concurrent.futures.ThreadPoolExecutor(2) as threads:
            replies = list(threads.map(lambda _: srv.generate("local/alpha"), range(2)))
        assert [r.status_code for r in replies] == [200, 200], replies[0].text
        assert calls == ["local/alpha"] and srv.pool.load_count == 1
        # the GGUF and the OpenAI API; ":latest" as Ollama clients send it
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=60, json={
            "model": "local/q8:latest", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == "local/q8", r.text
        running = {m["name"]: m for m in srv.ps()}
        assert set(running) == {"local/alpha:latest", "local/q8:latest"}
        alpha = running["local/alpha:latest"]
        assert alpha["context_length"] == 4096 and alpha["size_vram"] == 0 and alpha["size"] > 0
        assert alpha["expires_at"].endswith("Z") and alpha["details"]["family"] == "llama"
        # keep_alive 0: unloaded as soon as the request is over; negative: forever
        assert srv.generate("local/alpha", keep_alive=0).status_code == 200
        deadline = time.monotonic() + 2
        while "local/alpha:latest" in srv.loaded() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.loaded() == ["local/q8:latest"]
        assert srv.generate("local/q8", keep_alive=-1).status_code == 200
        assert srv.ps()[0]["expires_at"].startswith("2318")
        # a short keep_alive expires in the background; the unload idiom answers done_reason "unload"
        assert srv.generate("local/beta", keep_alive="300ms").status_code == 200
        time.sleep(0.8)
        assert srv.loaded() == ["local/q8:latest"]
        r = httpx.post(f"{srv.url}/api/generate", json={"model": "local/q8", "keep_alive": 0})
        assert r.json()["done_reason"] == "unload" and srv.loaded() == []
        # listings: everything available, loaded or not
        tags = {m["name"] for m in httpx.get(f"{srv.url}/api/tags").json()["models"]}
        assert {"local/alpha:latest", "local/beta:latest", "local/q8:latest"} <= tags
        ids = {m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]}
        assert {"local/alpha", "local/beta", "local/q8"} <= ids
        shown = httpx.post(f"{srv.url}/api/show", json={"model": "local/q8"}).json()
        assert shown["details"]["family"] == "llama" and shown["details"]["quantization_level"] == "Q8_0"
        assert srv.loaded() == []  # show and the listings load nothing


def test_eviction_busy_and_context_fit(models, caplog):
    alpha = full_size(models / "alpha")
    with Served(ModelPool(ENGINE_ARGS, max_memory=int(alpha * 1.5))) as srv:
        assert srv.generate("local/alpha").status_code == 200
        assert srv.generate("local/beta").status_code == 200  # alpha was idle: evicted
        assert srv.loaded() == ["local/beta:latest"]
        body = {"model": "local/beta", "prompt": "Once", "stream": True,
                "options": {"num_predict": 2000, "temperature": 1.0}}
        with httpx.stream("POST", f"{srv.url}/api/generate", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert json.loads(next(lines))["done"] is False  # beta is busy now
            busy = srv.generate("local/alpha")
            assert busy.status_code == 503 and busy.headers["Retry-After"]
            assert "server busy: 1 model in use" in busy.json()["error"]
            assert srv.ps()[0]["busy"] is True
        assert srv.generate("local/alpha").status_code == 200  # the stream ended: beta is idle again
        assert srv.loaded() == ["local/alpha:latest"]

    # a budget short of the full context: the largest context that fits (multiple of 256), logged and reported
    fixed = estimate_memory(models / "q8.gguf", 256, "float32")
    per_token = fixed.kv_bytes // 256
    budget = fixed.weights_bytes + fixed.overhead_bytes + per_token * 1000
    with caplog.at_level(logging.WARNING, logger="ember.server"), \
            Served(ModelPool(ENGINE_ARGS, max_memory=budget)) as srv:
        assert srv.generate("local/q8").status_code == 200
        (model,) = srv.ps()
        assert model["context_length"] == 768 and model["context_fitted"] is True
        assert any("context lowered to 768" in r.getMessage() for r in caplog.records)
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "local/q8", "prompt": list(range(5, 900))})
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_num_ctx_waits_for_a_busy_model_then_reloads_it(models):
    """Ollama's behaviour: a request for another num_ctx queues until the requests using the model are done,
    then the model is reloaded with that context (not a 503 for a model that is merely busy)."""
    with Served(ModelPool(ENGINE_ARGS)) as srv:
        body = {"model": "local/alpha", "prompt": "Once", "stream": True,
                "options": {"num_predict": 40, "temperature": 1.0}}
        with concurrent.futures.ThreadPoolExecutor(1) as pool, \
                httpx.stream("POST", f"{srv.url}/api/generate", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert json.loads(next(lines))["done"] is False  # alpha is busy with its default context
            resized = pool.submit(srv.generate, "local/alpha", options={"num_ctx": 512, "num_predict": 2})
            time.sleep(0.5)
            assert not resized.done()  # waiting for the stream, not refused
            assert json.loads(list(lines)[-1])["done"] is True
            assert resized.result(timeout=60).status_code == 200
        (model,) = srv.ps()
        assert model["context_length"] == 512


def test_paths_and_unknown_names_from_http(models, monkeypatch):
    import ember.store.resolve as resolve_module

    seen = []
    real = resolve_module.resolve
    monkeypatch.setattr(resolve_module, "resolve", lambda ref, **kw: seen.append(ref) or real(ref, **kw))
    with Served(ModelPool(ENGINE_ARGS, max_memory=2**40)) as srv:
        for name in ("../x", "/etc/passwd", "local/../../etc/passwd", "..\\x", "~/model", str(models / "alpha")):
            r = srv.generate(name)
            assert r.status_code in (400, 404), (name, r.text)
            chat = httpx.post(f"{srv.url}/v1/chat/completions",
                              json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
            assert chat.status_code in (400, 404) and chat.json()["error"]["param"] == "model"
        assert seen == []  # refused before the resolver looked at any file
        r = srv.generate("local/nothing")
        assert r.status_code == 404 and "local/nothing" in r.json()["error"]
        assert srv.pool.load_count == 0 and srv.loaded() == []


def test_default_model_and_ember_ps_stop(models, tmp_path):
    """`ember serve PATH` preloads PATH under its name (also the default for requests without a model);
    `ember ps` shows it, `ember stop` unloads it."""
    proc = start_server(models / "alpha")
    try:
        r = httpx.post(f"{proc.url}/api/generate", json={"prompt": "Hi", **GEN}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "alpha"

        def ember(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "ember.cli.main", *args, "--host", proc.url],
                                  capture_output=True, text=True, timeout=60)

        out = ember("ps")
        assert out.returncode == 0, out.stderr
        header, row = out.stdout.splitlines()
        assert header.split() == ["NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
        assert row.startswith("alpha:latest") and "CPU" in row and "4096" in row and "Forever" in row
        stopped = ember("stop", "alpha")
        assert stopped.returncode == 0, stopped.stderr
        assert [line.split() for line in ember("ps").stdout.splitlines()] == [header.split()]
        missing = ember("stop", "no-such-model")
        assert missing.returncode == 1 and "does not exist" in missing.stderr
    finally:
        proc.stop()
    gone = subprocess.run([sys.executable, "-m", "ember.cli.main", "ps", "--host", proc.url],
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1
    assert gone.stderr.strip() == f"error: no ember server at {proc.url}; start one with `ember serve`"


def test_store_endpoints(models):
    """/api/copy, /api/delete (unloading a loaded model first) and /api/pull's NDJSON errors, on ember's store."""
    from ember.store.store import ModelStore

    ModelStore().register("tiny:q8", {"tiny-llama-Q8_0.gguf": models / "q8.gguf"})
    with Served(ModelPool(ENGINE_ARGS, max_memory=2**40)) as srv:
        r = httpx.post(f"{srv.url}/api/copy", json={"source": "tiny:q8", "destination": "tiny:copy"})
        assert r.status_code == 200, r.text
        assert {"tiny:q8", "tiny:copy"} <= {m["name"] for m in httpx.get(f"{srv.url}/api/tags").json()["models"]}
        assert srv.generate("tiny:copy").status_code == 200 and srv.loaded() == ["tiny:copy"]
        r = httpx.request("DELETE", f"{srv.url}/api/delete", json={"model": "tiny:copy"})
        assert r.status_code == 200 and srv.loaded() == []
        r = httpx.request("DELETE", f"{srv.url}/api/delete", json={"model": "tiny:copy"})
        assert r.status_code == 404 and "error" in r.json()
        assert srv.generate("tiny:q8").status_code == 200  # the original still works
        assert httpx.post(f"{srv.url}/api/pull", json={"model": "../x"}).status_code == 400
        lines = httpx.post(f"{srv.url}/api/pull", json={"model": "not-a-repo"}).text.splitlines()
        assert json.loads(lines[0]) == {"status": "pulling manifest"} and "error" in json.loads(lines[-1])


def test_the_served_model_is_listed_first_before_it_loads(models):
    """Clients that take the first listed model when told none (`ember bench serve`) get the model `ember serve`
    was started with, even while it is still loading, not whichever available model sorts first."""
    with Served(ModelPool(ENGINE_ARGS, max_memory=2**40, default_model="local/q8", preload=False)) as srv:
        assert srv.loaded() == []
        ids = [m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]]
        assert ids[0] == "local/q8" and {"local/alpha", "local/beta"} <= set(ids[1:]), ids
