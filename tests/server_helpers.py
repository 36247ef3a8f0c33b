"""A tiny model and a real `ember serve` subprocess for the server tests."""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SERVE_ARGS = ["--dtype", "float32", "--kv-memory", "64M", "--max-num-seqs", "64"]


def make_tiny_chat_model(directory: Path, testdata: Path) -> Path:
    """The shared tiny llama (4 layers, 32k vocabulary, 4k context) with a chat template added."""
    source = testdata / "gguf" / "tiny-llama-hf"
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        (directory / name).write_bytes((source / name).read_bytes())
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    model_dir: Path
    api_key: str | None = None
    log_path: Path | None = None

    def output(self) -> str:
        """What the server printed so far (stdout and stderr)."""
        return self.log_path.read_text() if self.log_path else ""

    @property
    def model(self) -> str:
        return self.model_dir.name

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_server(model_dir: Path | None, *extra: str, api_key: str | None = None, timeout: float = 60,
                 extra_env: dict[str, str] | None = None) -> ServerProcess:
    """`ember serve model_dir` (None: the bundled model) on a free loopback port; `extra_env` adds variables."""
    port = free_port()
    args = [sys.executable, "-m", "ember.cli.main", "serve", *([str(model_dir)] if model_dir else []), "--host",
            "127.0.0.1", "--port", str(port), *SERVE_ARGS, *extra]
    # A HOME of its own, so models stored or cached on this machine never show up in the tests' listings.
    home = Path(tempfile.mkdtemp(prefix="ember-home-"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("EMBER_API_KEY", "EMBER_HOME", "EMBER_MODELS_PATH", "HF_HOME", "HF_HUB_CACHE", "OLLAMA_MODELS")}
    env["HOME"] = str(home)
    if api_key:
        env["EMBER_API_KEY"] = api_key
    env.update(extra_env or {})
    # Logs go to a file: an unread pipe would fill up and stall the server.
    log = open(home / "serve.log", "w+")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1) as client:  # one client: each new one loads the CA bundle (0.1 s of CPU or more)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"ember serve exited with {process.returncode}: {log.read()}")
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return ServerProcess(url, process, model_dir, api_key, home / "serve.log")
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"ember serve did not become healthy within {timeout} s")


_shared: dict[str, object] = {}


def shared_model(tmp_path_factory) -> Path:
    """One model folder per test session, whichever test module asks first."""
    if "model" not in _shared:
        from tests.conftest import SHARED

        if not SHARED.exists():
            pytest.fail(f"shared test data not found at {SHARED}")
        _shared["model"] = make_tiny_chat_model(tmp_path_factory.mktemp("server") / "tiny-chat", SHARED)
    return _shared["model"]


def shared_server(tmp_path_factory) -> ServerProcess:
    """One `ember serve` process per test session, shared by the test modules, stopped at exit."""
    if "server" not in _shared:
        proc = start_server(shared_model(tmp_path_factory))
        _shared["server"] = proc
        atexit.register(proc.stop)
    return _shared["server"]


class ThreadedServer:
    """The app on uvicorn in a background thread (real sockets and streaming), around a state the test builds."""

    def __init__(self, make_state):
        import uvicorn

        from ember.server.app import create_app

        port = free_port()
        self.state = make_state(port)
        config = uvicorn.Config(create_app(self.state), host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert self.state.load_error is None, self.state.load_error
            time.sleep(0.05)
        raise RuntimeError("in-process server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class InProcessServer(ThreadedServer):
    """One model served with the settings a test wants to vary (queue, key, body size)."""

    def __init__(self, model_dir: Path, **settings):
        from ember.engine.async_engine import AsyncEngine
        from ember.server.state import ServerState, Settings

        engine_args = settings.pop("engine_args", {})
        super().__init__(lambda port: ServerState(
            Settings(host="127.0.0.1", port=port, **settings),
            loader=lambda: AsyncEngine.from_model(str(model_dir), dtype="float32", kv_memory=2**24, **engine_args)))
