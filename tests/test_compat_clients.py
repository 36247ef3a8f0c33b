"""What `ember serve` says about its models and which request fields it honours, checked with the official
`ollama` and `openai` clients against a real server: a Q4_K_M GGUF made by llama.cpp (served by path) and a
tiny safetensors checkpoint built here (found through $EMBER_MODELS_PATH). The oracles: sha256 of the files,
the tensor shapes as the `gguf` and `safetensors` libraries read them, ember's engine run in-process."""

from __future__ import annotations

import hashlib
import json
import math

import httpx
import ollama
import openai
import pytest

from tests.server_helpers import start_server
from tests.tiny_models import build_tiny_model, copy_tokenizer

GGUF_NAME = "tiny-llama-Q4_K_M.gguf"
PROMPT = "a a a a a a"  # greedy, the tiny model repeats a token 6 steps later: a 4-token window allows it


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, testdata):
    models = tmp_path_factory.mktemp("models")
    checkpoint = build_tiny_model("llama", models / "tiny-st")
    copy_tokenizer(testdata / "gguf" / "tiny-llama-hf", checkpoint)
    gguf = testdata / "gguf" / GGUF_NAME
    server = start_server(gguf, extra_env={"EMBER_MODELS_PATH": str(models)}, timeout=120)
    yield server, gguf, checkpoint
    server.stop()


@pytest.fixture(scope="module")
def client(setup):
    return ollama.Client(host=setup[0].url, timeout=120)


def test_gguf_facts_in_tags_show_ps(setup, client):
    import gguf as gguf_lib

    _, path, _ = setup
    tensors = sum(int(t.n_elements) for t in gguf_lib.GGUFReader(path).tensors)
    client.generate(model=GGUF_NAME, prompt="hi", options={"num_predict": 1})
    tag = next(m for m in client.list().models if m.model.startswith(GGUF_NAME))
    assert tag.digest == sha256(path)
    assert tag.size == path.stat().st_size
    assert tag.details.quantization_level == "Q4_K_M" and tag.details.family == "llama"
    shown = client.show(GGUF_NAME)
    assert shown.modelinfo["general.parameter_count"] == pytest.approx(tensors, rel=0.01)
    assert shown.modelinfo["general.file_type"] == 15 and shown.modelinfo["llama.context_length"] == 4096
    assert shown.modelinfo["tokenizer.ggml.tokens"] is None  # arrays only with verbose, as Ollama
    assert shown.details.quantization_level == "Q4_K_M" and shown.capabilities == ["completion"]
    running = next(m for m in client.ps().models if m.model.startswith(GGUF_NAME))
    assert running.digest == sha256(path) and running.details.quantization_level == "Q4_K_M"


def test_show_verbose_decodes_arrays(setup):
    server = setup[0]
    reply = httpx.post(f"{server.url}/api/show", json={"model": GGUF_NAME, "verbose": True}, timeout=60).json()
    tokens = reply["model_info"]["tokenizer.ggml.tokens"]
    assert len(tokens) == 32000 and tokens[1] == "<s>"


def test_safetensors_facts_without_loading(setup, client):
    from safetensors import safe_open

    _, _, checkpoint = setup
    weights = checkpoint / "model.safetensors"
    with safe_open(weights, "pt") as f:
        total = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    tag = next(m for m in client.list().models if m.model.startswith("local/tiny-st"))
    assert tag.digest == sha256(weights)
    assert tag.details.quantization_level == "F32" and tag.details.family == "llama"
    shown = client.show("local/tiny-st")
    assert shown.modelinfo["general.parameter_count"] == pytest.approx(total, rel=0.01)
    assert shown.modelinfo["llama.context_length"] == 256
    assert "local/tiny-st" not in [m.model for m in client.ps().models]  # described, never loaded


def test_load_duration_is_measured(setup, client):
    client.generate(model=GGUF_NAME, prompt="", keep_alive=0)  # unload
    first = client.generate(model=GGUF_NAME, prompt="hello", options={"num_predict": 2})
    assert first.load_duration > 1_000_000  # a load from disk: over a millisecond
    assert first.total_duration >= first.load_duration
    client.generate(model=GGUF_NAME, prompt="", keep_alive=0)
    loaded = client.generate(model=GGUF_NAME, prompt="")  # Ollama's "load the model" request
    assert loaded.done_reason == "load" and loaded.load_duration > 1_000_000
    again = client.generate(model=GGUF_NAME, prompt="hello", options={"num_predict": 2})
    assert 0 < again.load_duration < loaded.load_duration  # already loaded: only the lookup


def test_num_ctx_changes_the_context(setup, client):
    client.generate(model=GGUF_NAME, prompt="hi", options={"num_ctx": 64, "num_predict": 1})
    running = next(m for m in client.ps().models if m.model.startswith(GGUF_NAME))
    assert running.context_length == 64
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=GGUF_NAME, prompt="word " * 80, options={"num_ctx": 64, "num_predict": 1})
    assert err.value.status_code == 400
    client.generate(model=GGUF_NAME, prompt="hi", options={"num_ctx": 512, "num_predict": 1})
    assert next(m for m in client.ps().models if m.model.startswith(GGUF_NAME)).context_length == 512


def test_repeat_last_n_matches_a_windowed_reference(setup, client):
    """Greedy with a strong penalty: the reply under repeat_last_n 4 is the in-process engine's with a 4-token
    window, and differs from the whole-context penalty (-1)."""
    from ember import LLM, SamplingParams

    _, path, _ = setup
    options = {"temperature": 0, "repeat_penalty": 3.0, "num_predict": 12}
    windowed = client.generate(model=GGUF_NAME, prompt=PROMPT, raw=True, options={**options, "repeat_last_n": 4})
    whole = client.generate(model=GGUF_NAME, prompt=PROMPT, raw=True, options={**options, "repeat_last_n": -1})
    llm = LLM(str(path), dtype="float32", max_model_len=256)
    reference = [llm.generate([PROMPT], SamplingParams(temperature=0, repetition_penalty=3.0, max_tokens=12,
                                                       repetition_window=window), use_tqdm=False)[0].text
                 for window in (4, None)]
    assert [windowed.response, whole.response] == reference
    assert windowed.response != whole.response


def test_unsupported_options_and_fields_are_refused_by_name(setup, client):
    for options, name in (({"mirostat": 2}, "mirostat"), ({"num_keep": 4}, "num_keep"), ({"bogus": 1}, "bogus")):
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model=GGUF_NAME, prompt="hi", options=options)
        assert err.value.status_code == 400 and name in str(err.value)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=GGUF_NAME, prompt="hi", template="{{ .Prompt }}")
    assert err.value.status_code == 400 and "template" in str(err.value)
    api = openai.OpenAI(base_url=f"{setup[0].url}/v1", api_key="x")
    for extra, name in (({"mirostat": 2}, "mirostat"), ({"reasoning_effort": "low"}, "reasoning_effort")):
        with pytest.raises(openai.BadRequestError) as err:
            api.chat.completions.create(model=GGUF_NAME, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=1, extra_body=extra)
        assert name in str(err.value)


def test_openai_model_card(setup):
    _, path, _ = setup
    api = openai.OpenAI(base_url=f"{setup[0].url}/v1", api_key="x")
    card = api.models.retrieve(GGUF_NAME)
    assert card.meta["digest"] == f"sha256:{sha256(path)}" and card.meta["quantization"] == "Q4_K_M"


def test_json_without_content_type(setup):
    """curl -d, as in Ollama's documentation, sends application/x-www-form-urlencoded."""
    url = setup[0].url
    body = json.dumps({"model": GGUF_NAME, "prompt": "hi", "stream": False, "options": {"num_predict": 1}})
    for headers in ({"Content-Type": "application/x-www-form-urlencoded"}, {}):
        reply = httpx.post(f"{url}/api/generate", content=body, headers=headers, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["done"] is True
    bad = httpx.post(f"{url}/api/show", content="model=x", headers={"Content-Type": "text/plain"}, timeout=60)
    assert bad.status_code == 400 and "text/plain" in bad.json()["error"]


def test_previous_response_id_continues_the_conversation(setup):
    api = openai.OpenAI(base_url=f"{setup[0].url}/v1", api_key="x")
    first = api.responses.create(model=GGUF_NAME, input="hello", max_output_tokens=4, temperature=0)
    second = api.responses.create(model=GGUF_NAME, input="again", previous_response_id=first.id,
                                  max_output_tokens=4, temperature=0)
    assert second.previous_response_id == first.id
    spelled_out = api.responses.create(model=GGUF_NAME, max_output_tokens=4, temperature=0, input=[
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "again"}])
    assert second.usage.input_tokens == spelled_out.usage.input_tokens > first.usage.input_tokens
    assert second.output_text == spelled_out.output_text
    unstored = api.responses.create(model=GGUF_NAME, input="hi", store=False, max_output_tokens=1)
    for missing in (unstored.id, "resp_unknown"):
        with pytest.raises(openai.BadRequestError) as err:
            api.responses.create(model=GGUF_NAME, input="x", previous_response_id=missing, max_output_tokens=1)
        assert "previous_response_id" in str(err.value)
