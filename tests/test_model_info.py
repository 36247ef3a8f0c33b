"""ModelInfo (ember.store.model_info), Ollama's options (ember.server.ollama_options) and the table of refused
request fields (ember.server.protocol), without a server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from pydantic import ValidationError

from ember.errors import InvalidParameter
from ember.server.ollama_options import check_options, num_ctx, ollama_params
from ember.server.protocol import ChatCompletionRequest, OllamaGenerateRequest, ResponsesRequest
from ember.store import model_info
from ember.store.model_info import describe_model, file_digest


@pytest.fixture
def checkpoint(tmp_path, testdata, monkeypatch):
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(model_info, "_memory", {})
    folder = tmp_path / "tiny"
    shutil.copytree(testdata / "gguf" / "tiny-llama-hf", folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6,
                                                               "top_p": 0.95, "eos_token_id": 2}))
    return folder


def test_digest_is_hashed_once_then_remembered(checkpoint, monkeypatch):
    weights = checkpoint / "model.safetensors"
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    calls = []
    from ember.store import store  # file_digest imports hash_file from it when it needs to hash

    hash_file = store.hash_file
    monkeypatch.setattr(store, "hash_file", lambda p: calls.append(p) or hash_file(p))
    assert file_digest(weights) == expected and len(calls) == 1
    assert file_digest(weights) == expected and len(calls) == 1  # remembered in memory
    monkeypatch.setattr(model_info, "_memory", {})
    assert file_digest(weights) == expected and len(calls) == 1  # and in $EMBER_HOME/digests.json
    os.utime(weights, ns=(1, 1))
    assert file_digest(weights) == expected and len(calls) == 2  # a changed file is hashed again
    blob = checkpoint.parent / f"sha256-{expected}"
    os.link(weights, blob)
    assert file_digest(blob) == expected and len(calls) == 2  # a blob named by its digest is not read


def test_checkpoint_description_and_defaults(checkpoint):
    info = describe_model("tiny", checkpoint, "safetensors")
    assert (info.family, info.architecture, info.quantization) == ("llama", "LlamaForCausalLM", "BF16")
    assert info.capabilities == ("completion",) and info.embedding_length == 256
    assert info.defaults == {"temperature": 0.6, "top_p": 0.95}
    params = ollama_params({}, info.defaults)  # the model's defaults over Ollama's
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 40)
    assert (params.repetition_penalty, params.repetition_window) == (1.1, 64)
    assert ollama_params({"temperature": 0.1}, info.defaults).temperature == 0.1  # the request's over both


def test_ollama_options():
    assert ollama_params({"repeat_last_n": -1}).repetition_window is None
    off = ollama_params({"repeat_last_n": 0, "repeat_penalty": 1.5})
    assert (off.repetition_penalty, off.repetition_window) == (1.0, None)
    assert ollama_params({"num_predict": -1}).max_tokens is None
    assert ollama_params({"num_predict": 7, "stop": ["x"], "seed": 3}).max_tokens == 7
    assert num_ctx(check_options({"num_ctx": 128})) == 128 and num_ctx({}) is None
    for options, field in (({"num_keep": 5}, "options.num_keep"), ({"mirostat": 1}, "options.mirostat"),
                           ({"wat": 1}, "options.wat")):
        with pytest.raises(InvalidParameter) as err:
            check_options(options)
        assert err.value.field == field
    with pytest.raises(InvalidParameter, match=r"options\.temperature"):
        ollama_params({"temperature": "hot"})
    with pytest.raises(InvalidParameter, match=r"options\.num_ctx"):
        num_ctx({"num_ctx": 0})
    with pytest.raises(InvalidParameter, match=r"options\.num_ctx"):
        num_ctx({"num_ctx": "8"})


@pytest.mark.parametrize(("model", "body", "refused"), [
    (ChatCompletionRequest, {"reasoning_effort": "low"}, "reasoning_effort"),
    (ChatCompletionRequest, {"store": True}, "store"),
    (ChatCompletionRequest, {"mirostat": 2}, "mirostat"),
    (ChatCompletionRequest, {"store": False, "modalities": ["text"], "service_tier": "auto"}, None),
    (ChatCompletionRequest, {"tools": [], "response_format": {"type": "text"}, "unknown_extra": 1}, None),
    (ResponsesRequest, {"truncation": "auto"}, "truncation"),
    (ResponsesRequest, {"truncation": "disabled", "previous_response_id": "resp_1"}, None),
    (OllamaGenerateRequest, {"template": "{{ .Prompt }}"}, "template"),
    (OllamaGenerateRequest, {"template": "", "logprobs": False}, None),
])
def test_defined_but_unhonoured_fields_are_refused(model, body, refused):
    base = {"messages": [{"role": "user", "content": "hi"}]} if model is ChatCompletionRequest else (
        {"input": "hi"} if model is ResponsesRequest else {"prompt": "hi"})
    if refused is None:
        model.model_validate({**base, **body})
        return
    with pytest.raises(ValidationError) as err:
        model.model_validate({**base, **body})
    first = err.value.errors()[0]
    assert first["type"] == "unsupported_field" and first["ctx"]["field"] == refused


def test_llm_generate_use_tqdm(capsys):
    from ember import LLM, SamplingParams

    llm = LLM(None, dtype="float32")
    llm.generate(["a", "b"], SamplingParams(max_tokens=2), use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "2/2" in err
    llm.generate(["a"], SamplingParams(max_tokens=2))
    assert "Processed prompts" not in capsys.readouterr().err
