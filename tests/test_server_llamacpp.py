"""llama.cpp's own server routes on `ember serve`: /completion (whole and streamed), /props and /slots."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server_helpers import shared_server

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_server(tmp_path_factory)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def openai_completion(server, **body) -> dict:
    r = post(server, "/v1/completions", {"prompt": PROMPT, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def check_timings(result: dict) -> None:
    timings = result["timings"]
    assert timings["predicted_n"] == result["tokens_predicted"]
    assert timings["prompt_n"] + timings["cache_n"] == result["tokens_evaluated"]
    assert timings["prompt_ms"] > 0 and timings["predicted_ms"] >= 0
    for kind in ("prompt", "predicted"):
        if f"{kind}_per_second" in timings:
            assert timings[f"{kind}_per_second"] == pytest.approx(timings[f"{kind}_n"] * 1e3 / timings[f"{kind}_ms"])
            assert timings[f"{kind}_per_token_ms"] == pytest.approx(timings[f"{kind}_ms"] / timings[f"{kind}_n"])


def test_completion_matches_openai_route(server):
    expected = openai_completion(server, max_tokens=8)
    r = post(server, "/completion", {"prompt": PROMPT, "n_predict": 8, "temperature": 0, "return_tokens": True})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["content"] == expected["choices"][0]["text"] and result["stop"] is True
    assert result["tokens_predicted"] == expected["usage"]["completion_tokens"] == len(result["tokens"])
    assert result["tokens_evaluated"] == expected["usage"]["prompt_tokens"]
    assert result["stop_type"] == {"length": "limit", "stop": "eos"}[expected["choices"][0]["finish_reason"]]
    assert result["stopping_word"] == "" and result["model"] == server.model
    settings = result["generation_settings"]
    assert settings["n_predict"] == 8 and settings["temperature"] == 0 and settings["top_k"] == 40
    assert settings["repeat_last_n"] == 64  # llama.cpp's default window of the repetition penalty
    windowed = post(server, "/completion", {"prompt": PROMPT, "n_predict": 1, "repeat_penalty": 1.3,
                                            "repeat_last_n": 16}).json()["generation_settings"]
    assert windowed["repeat_last_n"] == 16 and windowed["repeat_penalty"] == 1.3
    check_timings(result)


def test_completion_stream(server):
    body = {"prompt": PROMPT, "n_predict": 6, "temperature": 0, "stream": True, "n_probs": 2}
    with httpx.stream("POST", f"{server.url}/completion", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines]
    assert [c["stop"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    final = chunks[-1]
    whole = post(server, "/completion", {**body, "stream": False}).json()
    assert "".join(c["content"] for c in chunks) == whole["content"]
    assert [t for c in chunks[:-1] for t in c["tokens"]] == [p["id"] for p in whole["completion_probabilities"]]
    assert all(len(p["top_logprobs"]) == 2 for c in chunks[:-1] for p in c["completion_probabilities"])
    assert final["tokens_predicted"] == whole["tokens_predicted"] == 6 and final["stop_type"] == "limit"
    check_timings(final)


def test_stopping_word_and_token_prompt(server):
    whole = post(server, "/completion", {"prompt": PROMPT, "n_predict": 12, "temperature": 0}).json()["content"]
    word = whole[len(whole) // 2:][:3]
    ids = httpx.post(f"{server.url}/tokenize", json={"content": PROMPT, "add_special": True}).json()["tokens"]
    result = post(server, "/completion", {"prompt": ids, "n_predict": 12, "temperature": 0, "stop": [word]}).json()
    assert result["stop_type"] == "word" and result["stopping_word"] == word
    assert result["content"] == whole[: whole.index(word)]


def test_evaluate_only_and_cache_prompt(server):
    long_prompt = PROMPT + " and they lived happily ever after" * 8
    first = post(server, "/completion", {"prompt": long_prompt, "n_predict": 0}).json()
    assert first["tokens_predicted"] == 0 and first["content"] == "" and first["stop_type"] == "limit"
    again = post(server, "/completion", {"prompt": long_prompt, "n_predict": 1}).json()
    assert again["tokens_cached"] > 0 and again["timings"]["cache_n"] == again["tokens_cached"]
    fresh = post(server, "/completion", {"prompt": long_prompt, "n_predict": 1, "cache_prompt": False}).json()
    assert fresh["tokens_cached"] == 0 and fresh["timings"]["prompt_n"] == fresh["tokens_evaluated"]
    for cache_prompt, cached in ((True, again["tokens_cached"]), (False, 0)):  # on the OpenAI route too
        usage = post(server, "/v1/completions", {"prompt": long_prompt, "max_tokens": 1,
                                                 "cache_prompt": cache_prompt}).json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == cached


def test_logit_bias_forms(server):
    plain = post(server, "/completion", {"prompt": PROMPT, "n_predict": 1, "temperature": 0,
                                         "return_tokens": True}).json()["tokens"][0]
    for bias in ([[plain, False]], {str(plain): -100}):
        token = post(server, "/completion", {"prompt": PROMPT, "n_predict": 1, "temperature": 0, "return_tokens": True,
                                             "logit_bias": bias}).json()["tokens"][0]
        assert token != plain


@pytest.mark.parametrize("extra, param", [
    ({"mirostat": 2}, "mirostat"),
    ({"typical_p": 0.5}, "typical_p"),
    ({"samplers": ["top_k"]}, "samplers"),
    ({"dry_multiplier": 0.8}, "dry_multiplier"),
    ({"repeat_last_n": -2}, "repeat_last_n"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"n_predict": -5}, "n_predict"),
    ({"logit_bias": [[1]]}, "logit_bias"),
])
def test_refused_fields(server, extra, param):
    r = post(server, "/completion", {"prompt": PROMPT, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_off_values_are_accepted(server):
    body = {"prompt": PROMPT, "n_predict": 2, "mirostat": 0, "typical_p": 1.0, "dry_multiplier": 0,
            "dry_base": 1.75, "xtc_probability": 0, "n_keep": 0, "id_slot": -1, "repeat_last_n": 0}
    assert post(server, "/completion", body).status_code == 200


def test_props(server):
    props = httpx.get(f"{server.url}/props").json()
    assert props["total_slots"] == 64  # --max-num-seqs of the test server
    assert props["model_path"] == str(server.model_dir)
    assert props["chat_template"].startswith("{{ bos_token }}")
    settings = props["default_generation_settings"]
    assert settings["n_ctx"] == settings["params"]["n_ctx"] > 0 and settings["is_processing"] is False
    assert {k: settings["params"][k] for k in ("temperature", "top_k", "top_p", "min_p", "n_predict")} == {
        "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "n_predict": -1}


def test_slots_show_a_running_request(server):
    idle = httpx.get(f"{server.url}/slots").json()
    assert len(idle) == 64 and [s["id"] for s in idle] == list(range(64))
    assert not any(s["is_processing"] for s in idle)
    body = {"prompt": PROMPT, "n_predict": 400, "ignore_eos": True, "stream": True, "temperature": 0.5}
    seen: list[dict] = []
    with httpx.stream("POST", f"{server.url}/completion", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line:  # generating: the slot is busy now
                seen = [s for s in httpx.get(f"{server.url}/slots").json() if s["is_processing"]]
                break
    assert len(seen) == 1
    assert seen[0]["params"]["n_predict"] == 400 and seen[0]["params"]["temperature"] == 0.5
    assert 0 < seen[0]["next_token"]["n_decoded"] < 400
    assert seen[0]["next_token"]["n_remain"] == 400 - seen[0]["next_token"]["n_decoded"]
    assert httpx.get(f"{server.url}/slots", params={"fail_on_no_slot": 1}).status_code == 200

