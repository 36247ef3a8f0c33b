"""Fill-in-the-middle: OpenAI's `suffix` builds [BOS] PRE prefix SUF suffix MID from the vocabulary's FIM tokens."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
import torch

from ember.formats.gguf import GGUFFile
from ember.server.prompting import fim_prompt_ids
from ember.tokenizer.gguf_vocab import tokenizer_from_gguf_metadata
from ember.tokenizer.tokenizer import Tokenizer
from tests.server_helpers import InProcessServer, shared_server
from tests.tiny_models import TINY

FIM = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
PREFIX, SUFFIX = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def fim_model(tmp_path_factory, testdata):
    """A tiny random Llama whose tokenizer (tiny-llama's) has StarCoder's three FIM tokens added."""
    import transformers
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    directory = tmp_path_factory.mktemp("fim")
    source = testdata / "gguf" / "tiny-llama-hf"
    hf = HFTokenizer.from_file(str(source / "tokenizer.json"))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in FIM])
    hf.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text((source / "tokenizer_config.json").read_text())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, "vocab_size": hf.get_vocab_size()})
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def expected_ids(tokenizer: Tokenizer, prefix: str, suffix: str) -> list[int]:
    pre, suf, mid = (tokenizer.hf.token_to_id(t) for t in FIM)
    encode = tokenizer.hf.encode
    return [tokenizer.bos_token_id, pre, *encode(prefix, add_special_tokens=False).ids, suf,
            *encode(suffix, add_special_tokens=False).ids, mid]


def test_fim_prompt_order(fim_model):
    tokenizer = Tokenizer.from_dir(fim_model)
    assert tokenizer.fim_token_ids == (32000, 32001, 32002)
    ids = fim_prompt_ids(SimpleNamespace(tokenizer=tokenizer, max_model_len=4096), PREFIX, SUFFIX)
    assert ids == expected_ids(tokenizer, PREFIX, SUFFIX)
    assert ids[:2] == [1, 32000] and ids[-1] == 32002 and ids.count(32001) == 1


def test_gguf_metadata_ids_win(testdata):
    with GGUFFile(testdata / "vocab" / "ggml-vocab-starcoder.gguf") as gguf:
        metadata = dict(gguf.metadata)
    assert tokenizer_from_gguf_metadata(metadata).fim_token_ids == (1, 3, 2)  # found by name
    metadata.update({"tokenizer.ggml.fim_pre_token_id": 10, "tokenizer.ggml.fim_suf_token_id": 11,
                     "tokenizer.ggml.fim_mid_token_id": 12})
    assert tokenizer_from_gguf_metadata(metadata).fim_token_ids == (10, 11, 12)


def test_suffix_through_the_server(fim_model):
    tokenizer = Tokenizer.from_dir(fim_model)
    ids = expected_ids(tokenizer, PREFIX, SUFFIX)
    with InProcessServer(fim_model) as served:
        body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 0, "echo": True, "logprobs": 0}
        reply = httpx.post(f"{served.url}/v1/completions", json=body, timeout=60).json()
        assert reply["usage"]["prompt_tokens"] == len(ids)
        pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        assert [t.lstrip() for t in reply["choices"][0]["logprobs"]["tokens"]] == [p.lstrip() for p in pieces]
        generated = httpx.post(f"{served.url}/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX,
                                                                     "max_tokens": 3, "temperature": 0}).json()
        assert generated["usage"]["prompt_tokens"] == len(ids) and generated["usage"]["completion_tokens"] >= 1
        r = httpx.post(f"{served.url}/v1/completions", json={"prompt": [1, 2, 3], "suffix": SUFFIX})
        assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


def test_suffix_without_fim_tokens_is_refused(tmp_path_factory):
    server = shared_server(tmp_path_factory)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    assert "fill-in-the-middle" in r.json()["error"]["message"]


def test_stream_usage_options(tmp_path_factory):
    server = shared_server(tmp_path_factory)
    body = {"prompt": PREFIX, "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"] is not None for c in chunks) and counts == sorted(counts) and counts[-1] == 4
    assert chunks[-1]["choices"] == [] and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"] for c in chunks)
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
