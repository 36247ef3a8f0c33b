"""LoRA adapters through `ember serve` (docs/lora.md): --lora at start, listed in /v1/models, chosen by the
request's model, loaded and unloaded at run time, and the errors of each."""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import save_file

from tests.server_helpers import shared_model, shared_server, start_server

openai = pytest.importorskip("openai")

DATA = __import__("pathlib").Path(__file__).parent / "data" / "lora"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = start_server(shared_model(tmp_path_factory), "--lora", f"style={DATA / 'peft'}", "--runtime-lora",
                        timeout=120)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _complete(client, model: str, max_tokens: int = 16) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0).choices[0].text


def test_adapter_listed_and_used_by_name(client, server):
    from ember import LLM, SamplingParams

    cards = {m.id: m for m in client.models.list().data}
    assert cards["style"].parent == server.model and cards["style"].root == str(DATA / "peft")
    assert client.models.retrieve("style").parent == server.model
    llm = LLM(str(server.model_dir), dtype="float32", lora=[f"style={DATA / 'peft'}"])
    expected = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16), lora="style")[0].text
    adapted = client.completions.create(model="style", prompt=PROMPT, max_tokens=16, temperature=0)
    assert adapted.model == "style"
    assert adapted.choices[0].text == expected
    assert expected != _complete(client, server.model)
    chat = client.chat.completions.create(model="style", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.model == "style"
    # Embeddings come from the base model: an adapter's name is refused, not ignored.
    response = httpx.post(f"{server.url}/v1/embeddings", json={"model": "style", "input": "hi"}, timeout=30)
    assert response.status_code == 400 and "LoRA adapter" in response.json()["error"]["message"]


def test_load_and_unload_at_run_time(client, server):
    url = server.url
    load = httpx.post(f"{url}/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": "converted", "lora_path": str(DATA / "tiny-llama-lora-f16.gguf")})
    assert load.status_code == 200, load.text
    assert "converted" in {m.id for m in client.models.list().data}
    # llama.cpp's conversion of the same adapter (f16 values, as the PEFT one holds) answers as the PEFT one.
    assert _complete(client, "converted") == _complete(client, "style")
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "converted"}, timeout=30).status_code == 200
    assert "converted" not in {m.id for m in client.models.list().data}
    gone = httpx.post(f"{url}/v1/completions", json={"model": "converted", "prompt": PROMPT}, timeout=30)
    assert gone.status_code == 404


def test_unload_refused_while_in_use(server):
    url = server.url
    body = {"model": "style", "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()  # kept: a dropped iterator closes the stream, and the server aborts it
        next(lines)  # the request is running
        busy = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "style"}, timeout=30)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "lora_in_use"
    assert "style" in {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}


def test_load_errors(server, tmp_path):
    url = server.url

    def load(**body):
        return httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=30)

    missing = load(lora_name="x", lora_path=str(tmp_path / "nowhere"))
    assert missing.status_code == 400 and "does not exist" in missing.json()["error"]["message"]
    assert load(lora_name="style", lora_path=str(DATA / "peft")).status_code == 400  # name taken
    assert load(lora_name="bad name", lora_path=str(DATA / "peft")).status_code == 400
    assert load(lora_name="x", lora_path=str(DATA / "peft"), extra=1).status_code == 400  # unknown field
    assert load(lora_name="x").status_code == 400
    # Shapes of another base model: refused, naming the module.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text((DATA / "peft" / "adapter_config.json").read_text())
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(8, 100), f"{prefix}.lora_B.weight": torch.zeros(256, 8)},
              str(wrong / "adapter_model.safetensors"))
    shapes = load(lora_name="x", lora_path=str(wrong))
    assert shapes.status_code == 400 and "q_proj" in shapes.json()["error"]["message"]
    unknown = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "nope"}, timeout=30)
    assert unknown.status_code == 404
    assert "x" not in {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}


def test_runtime_loading_is_off_by_default(tmp_path_factory):
    shared = shared_server(tmp_path_factory)
    response = httpx.post(f"{shared.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/"}, timeout=30)
    assert response.status_code == 403


def test_lora_is_checked_before_serving(tmp_path):
    """A --lora path that does not exist is a one-line CLI error; the server does not start."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "ember.cli.main", "serve", str(tmp_path), "--lora",
                           f"x={tmp_path / 'missing'}"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--lora" in done.stderr and "Traceback" not in done.stderr
