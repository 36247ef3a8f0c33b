"""Hostile requests (issue #18): lone surrogates, simultaneous arrivals past --max-queue, multi-megabyte texts,
protected model names, /api/pull of a name that is no Hugging Face repo, and the tokenizer's length bound."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import SHARED
from tests.server_helpers import InProcessServer, shared_model, shared_server

HOSTILE_BRANCH = "{% if messages[-1]['content'] == 'explode' %}{{ 'ab'|center(10**9) }}{% endif %}"
LONE = "a\ud800b"  # sent as the JSON escape "a\ud800b": valid JSON, not valid Unicode
MESSAGES = [{"role": "user", "content": LONE}]

# Every endpoint that takes text, with a body whose text holds a lone surrogate.
TEXT_ENDPOINTS = [
    ("/v1/completions", {"prompt": LONE, "max_tokens": 2}),
    ("/v1/completions", {"prompt": "hi", "suffix": LONE, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/embeddings", {"input": [LONE]}),
    ("/v1/responses", {"input": LONE}),
    ("/v1/messages", {"model": "x", "max_tokens": 2, "messages": MESSAGES}),
    ("/v1/messages/count_tokens", {"model": "x", "messages": MESSAGES}),
    ("/v1/rerank", {"query": LONE, "documents": ["a"]}),
    ("/v1/score", {"text_1": LONE, "text_2": "a"}),
    ("/api/generate", {"prompt": LONE, "stream": False}),
    ("/api/chat", {"messages": MESSAGES, "stream": False}),
    ("/api/embed", {"input": LONE}),
    ("/api/embeddings", {"prompt": LONE}),
    ("/tokenize", {"content": LONE}),
    ("/apply-template", {"messages": MESSAGES}),
    ("/completion", {"prompt": LONE, "n_predict": 2}),
    ("/infill", {"input_prefix": LONE, "input_suffix": "x"}),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_server(tmp_path_factory)


@pytest.mark.parametrize("path, body", TEXT_ENDPOINTS, ids=[f"{p}:{sorted(b)[0]}" for p, b in TEXT_ENDPOINTS])
def test_lone_surrogate_is_400_in_the_api_shape(server, path, body):
    r = httpx.post(f"{server.url}{path}", content=json.dumps(body), timeout=30,  # ASCII JSON: "\ud800"
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(error, str) and "lone UTF-16 surrogate" in error
    elif path.startswith("/v1/messages"):
        assert r.json()["type"] == "error" and error["type"] == "invalid_request_error"
        assert "lone UTF-16 surrogate" in error["message"]
    else:
        assert error["code"] == "invalid_unicode" and "lone UTF-16 surrogate" in error["message"]
        assert error["param"] is not None and error["param"].split(".")[0] in body


def test_surrogate_pairs_and_escaped_backslashes_still_work(server):
    r = httpx.post(f"{server.url}/tokenize", content=b'{"content": "\\ud83d\\ude00 \\\\ud800"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["tokens"]
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": r.json()["tokens"]})
    assert r.json()["content"].strip() == "\U0001F600 \\ud800"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat", "/v1/messages", "/tokenize"])
def test_invalid_utf8_is_400_naming_the_byte(server, path):
    """A body that is not UTF-8 got FastAPI's "There was an error parsing the body"; now the byte and offset."""
    body = b'{"messages": [{"role": "user", "content": "caf\xe9 \xff"}], "content": "x"}'
    r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert "not valid UTF-8: byte 0xE9 at offset 46" in message, message
    if path.startswith("/v1/chat"):
        assert error["code"] == "invalid_utf8"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_empty_role_is_400_naming_the_field(server, path):
    """An empty role was accepted and rendered as a nameless turn."""
    r = httpx.post(f"{server.url}{path}", json={"messages": [{"role": "", "content": "hi"}], "stream": False},
                   timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "messages.0.role" in (error if isinstance(error, str) else error["message"] + str(error["param"]))


def test_multi_megabyte_texts_do_not_stall_the_server(server):
    """/health keeps answering while a 3 MB text is tokenized and a 3 MB chat is refused (before this fix, each
    held the event loop for seconds); the chat is refused by the length bound, without tokenizing it."""
    text = "the quick brown fox jumps over the lazy dog. " * 70_000  # 3.15 MB, ~700k tokens
    results: dict[str, httpx.Response] = {}
    took: dict[str, float] = {}

    def post(name: str, path: str, body: dict) -> None:
        began = time.monotonic()
        results[name] = httpx.post(f"{server.url}{path}", json=body, timeout=300)
        took[name] = time.monotonic() - began

    workers = [threading.Thread(target=post, args=("tokenize", "/tokenize", {"content": text})),
               threading.Thread(target=post, args=("chat", "/v1/chat/completions",
                                                   {"messages": [{"role": "user", "content": text}]}))]
    for worker in workers:
        worker.start()
    slowest, probes = 0.0, 0
    while any(w.is_alive() for w in workers) and probes < 400:
        began = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        slowest, probes = max(slowest, time.monotonic() - began), probes + 1
        time.sleep(0.02)
    for worker in workers:
        worker.join(300)
    assert results["tokenize"].status_code == 200 and len(results["tokenize"].json()["tokens"]) > 500_000
    chat = results["chat"]
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "context_length_exceeded", chat.text
    assert probes >= 3, "the big requests ended before /health could be probed"
    # Within 0.5 s; on a machine so loaded that the tokenizing itself took over 5 s, within a tenth of its time
    # (before the fix /health waited for all of it).
    bound = max(0.5, took["tokenize"] / 10)
    assert slowest < bound, f"/health took {slowest:.2f} s while big texts were in flight ({took})"


def test_text_that_cannot_fit_is_refused_everywhere(server):
    """Refused by its length alone (the message says so), before tokenizing."""
    text = "x" * 200_000  # > 4096 tokens by the tiny vocabulary's bound (16 characters per token at most)
    for path, body in [("/v1/completions", {"prompt": text}), ("/api/generate", {"prompt": text, "stream": False}),
                       ("/v1/embeddings", {"input": text}), ("/completion", {"prompt": text})]:
        r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
        assert r.status_code == 400, (path, r.text)
        message = r.json()["error"] if path.startswith("/api/") else r.json()["error"]["message"]
        assert re.search(r"20\d{4} characters, so at least 12\d{3} tokens, more than the context of 4096", message)


# --- admission -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    """Two sequence slots and a queue of 4: room for 6 sequences. Its chat template turns hostile when the last
    message says "explode"."""
    folder = tmp_path_factory.mktemp("hostile") / "tiny-hostile"
    shutil.copytree(shared_model(tmp_path_factory), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = HOSTILE_BRANCH + config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with InProcessServer(folder, max_queue=4, engine_args={"max_num_seqs": 2}) as srv:
        yield srv


def test_simultaneous_arrivals_respect_max_queue(queued):
    """20 requests arriving together: exactly 2 slots + 4 queued are admitted, the other 14 get 503 queue_full;
    once the clients are gone (streams closed, a waiting non-stream request abandoned) nothing stays reserved."""
    body = {"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True}

    async def run() -> None:
        async with httpx.AsyncClient(base_url=queued.url, timeout=60) as client:
            async def one(_: int):
                request = client.build_request("POST", "/v1/completions", json=body)
                response = await client.send(request, stream=True)
                if response.status_code != 200:
                    await response.aread()
                    assert response.json()["error"]["code"] == "queue_full" and response.headers["Retry-After"]
                return response

            responses = await asyncio.gather(*(one(i) for i in range(20)))
            try:
                assert sorted(r.status_code for r in responses) == [200] * 6 + [503] * 14
                assert queued.state.admitted == 6
            finally:
                for response in responses:
                    await response.aclose()

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while queued.state.admitted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queued.state.admitted == 0 and not queued.state.inflight
    r = httpx.post(f"{queued.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


def test_admission_released_when_a_request_fails(queued):
    """A request refused after parsing (a prompt longer than the context) or cut by a timeout leaves nothing
    reserved."""
    r = httpx.post(f"{queued.url}/v1/completions", json={"prompt": list(range(10, 5000))})
    assert r.status_code == 400
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{queued.url}/v1/completions", timeout=httpx.Timeout(10, read=0.5),
                   json={"prompt": "hi", "max_tokens": 3000, "ignore_eos": True})
    deadline = time.monotonic() + 10
    while queued.state.admitted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queued.state.admitted == 0


def test_hostile_template_is_a_clear_400(queued):
    for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "explode"}]}),
                       ("/api/chat", {"messages": [{"role": "user", "content": "explode"}], "stream": False})]:
        began = time.monotonic()
        r = httpx.post(f"{queued.url}{path}", json=body, timeout=30)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        # refused when the filter is called, before it allocates (not by the output cap after building it)
        assert "builds a value that is too large" in (error if isinstance(error, str) else error["message"])
        assert time.monotonic() - began < 5
    r = httpx.post(f"{queued.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


# --- the tokenizer's length bound -------------------------------------------------------------------------------
VOCABS = sorted((SHARED / "vocab").glob("*.gguf"))


@pytest.mark.parametrize("path", VOCABS, ids=[p.name for p in VOCABS])
def test_length_bound_never_exceeds_the_real_count(path: Path):
    """min_tokens is a lower bound on real tokenizations: the texts that pack most characters into a token (the
    longest pieces repeated, whitespace runs, composing marks, llama.cpp's test strings)."""
    from ember.tokenizer.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    bound = tokenizer.max_chars_per_token
    if path.name in ("ggml-vocab-bert-bge.gguf",):
        assert bound is None  # WordPiece folds a whole unknown word into one [UNK]: no bound from length
        return
    if bound is None:
        return
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    longest = sorted(vocab, key=len)[-20:]
    pieces = [tokenizer.decode([vocab[p]], skip_special_tokens=False) for p in longest]
    texts = [piece * 50 for piece in pieces] + [" " * 5000, "\n" * 3000, "e\u0301" * 2000, "\u1100\u1161\u11a8" * 500,
                                                 "".join(pieces)]
    texts += (path.parent / f"{path.name}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    for text in texts:
        assert tokenizer.min_tokens(text) <= len(tokenizer.encode(text, add_special_tokens=False)), text[:40]


# --- protected names and pull ---------------------------------------------------------------------------------
def test_reserved_and_served_names_are_protected(server):
    for destination in ("ember-default", "ember-default:latest", "all-minilm", "all-minilm:l6-v2", server.model):
        r = httpx.post(f"{server.url}/api/copy", json={"source": server.model, "destination": destination})
        error = r.json()["error"]
        assert r.status_code == 403 and ("cannot be copied onto" in error or "copying onto it" in error), r.text
    for name in ("ember-default", "all-minilm", server.model):
        r = httpx.request("DELETE", f"{server.url}/api/delete", json={"model": name})
        assert r.status_code == 403 and "cannot be removed" in r.json()["error"], (name, r.text)
    names = [m["name"] for m in httpx.get(f"{server.url}/api/tags").json()["models"]]
    assert names.count("ember-default:latest") == 1  # the built-in model, not a second copy
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200  # the served model was not unloaded


def test_pull_of_a_name_that_is_no_repo(server):
    r = httpx.post(f"{server.url}/api/pull", json={"model": "not-a-repo", "stream": False})
    assert r.status_code == 400 and "Hugging Face repo id" in r.json()["error"]
    r = httpx.post(f"{server.url}/api/pull", json={"model": "not-a-repo", "stream": True})
    rows = [line for line in r.text.splitlines() if line]
    assert r.status_code == 200 and '"pulling manifest"' in rows[0] and "Hugging Face repo id" in rows[-1]
