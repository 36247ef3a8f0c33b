"""`ember bench serve` against a fake OpenAI-compatible streaming server with known timings."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ember.bench import datasets, metrics
from ember.bench.serve import RunSettings, ServerError, Target, check_server, server_models
from ember.cli.main import main

FIRST_TOKEN_DELAY = 0.02  # seconds before the first token: TTFT can be no shorter
TOKEN_DELAY = 0.005  # seconds between tokens: TPOT and ITL can be no shorter


def fake_app(tokenize: str | None = "content") -> FastAPI:
    """Streams max_tokens chunks of one word each; /tokenize counts one token per word of the text under
    the key `tokenize` ("content" as llama.cpp, "prompt" as vLLM; None: no /tokenize)."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    if tokenize:
        @app.post("/tokenize")
        async def tokenize_(request: Request):
            body = await request.json()
            if tokenize not in body:
                return JSONResponse({"error": f"{tokenize} is required"}, status_code=400)
            return {"tokens": list(range(len(body[tokenize].split())))}

    async def stream(body: dict, chat: bool):
        prompt_tokens = len((body["messages"][-1]["content"] if chat else body["prompt"]).split())
        count = body["max_tokens"]
        await asyncio.sleep(FIRST_TOKEN_DELAY)
        for i in range(count):
            if i:
                await asyncio.sleep(TOKEN_DELAY)
            choice = {"index": 0, "delta": {"content": " word"}} if chat else {"index": 0, "text": " word"}
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    async def complete(request: Request, chat: bool):
        body = await request.json()
        if body.get("model") != "fake-model":
            return JSONResponse({"error": {"message": "model not found"}}, status_code=404)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


class FakeServer:
    def __init__(self, app: FastAPI):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started, "fake server did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server_url():
    with FakeServer(fake_app()) as url:
        yield url


@pytest.fixture(scope="module")
def second_url():
    with FakeServer(fake_app(tokenize=None)) as url:
        yield url


def bench(capsys, *argv: str) -> dict:
    assert main(["bench", "serve", "--output", "json", "--no-progress", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_figures_are_consistent(capsys, server_url, tmp_path):
    saved = tmp_path / "result.json"
    record = bench(capsys, "--url", server_url, "--num-prompts", "8", "--random-input-len", "12",
                   "--random-output-len", "6", "-c", "1,4", "--goodput", "ttft:10000", "tpot:10000",
                   "--save-result", str(saved))
    assert record["settings"]["exact_lengths"] is True
    assert [run["max_concurrency"] for run in record["runs"]] == [1, 4]
    for run in record["runs"]:
        assert run["model"] == "fake-model"  # found through /v1/models
        assert (run["completed"], run["failed"]) == (8, 0)
        assert run["input_tokens"] == 8 * 12  # token-exact through /tokenize
        assert run["output_tokens"] == 8 * 6
        duration = run["duration_s"]
        assert run["output_throughput"] == pytest.approx(run["output_tokens"] / duration)
        assert run["request_throughput"] == pytest.approx(8 / duration)
        assert run["total_token_throughput"] == pytest.approx((8 * 12 + 8 * 6) / duration)
        assert run["goodput"] == pytest.approx(run["request_throughput"])  # every request meets loose SLOs
        for metric in metrics.LATENCIES:
            assert run[f"{metric}_median_ms"] <= run[f"{metric}_p90_ms"] <= run[f"{metric}_p99_ms"]
            assert run[f"{metric}_mean_ms"] > 0
        assert run["ttft_median_ms"] >= FIRST_TOKEN_DELAY * 1000
        assert run["tpot_median_ms"] >= TOKEN_DELAY * 1000
        assert run["itl_median_ms"] >= TOKEN_DELAY * 1000 * 0.9
        assert run["e2el_mean_ms"] <= duration * 1000
    detailed = json.loads(saved.read_text())
    # c=4 overlaps requests: the run takes clearly less than its requests' latencies end to end (at c=1 the two
    # are equal). Measured within one run, so a stall of the machine lengthens both sides alike.
    overlapped = detailed["runs"][1]
    assert all(r["e2el"] <= overlapped["duration_s"] for r in overlapped["requests"])  # seconds, both
    assert overlapped["duration_s"] < 0.7 * sum(r["e2el"] for r in overlapped["requests"])
    for request in detailed["runs"][0]["requests"]:
        tpot = (request["e2el"] - request["ttft"]) / (request["output_tokens"] - 1)
        assert request["ttft"] + tpot * (request["output_tokens"] - 1) == pytest.approx(request["e2el"])
        assert len(request["itl"]) == request["output_tokens"] - 1
        assert sum(request["itl"]) <= request["e2el"] - request["ttft"] + 1e-6


def test_goodput_counts_only_requests_within_slos(capsys, server_url):
    record = bench(capsys, "--url", server_url, "--num-prompts", "3", "--random-input-len", "4",
                   "--random-output-len", "3", "--goodput", "ttft:1")
    assert record["runs"][0]["goodput"] == 0.0  # no request gets its first token within 1 ms


def test_compare_two_servers_side_by_side(capsys, server_url, second_url, tmp_path):
    plot = tmp_path / "serve.png"
    record = bench(capsys, "--url", server_url, "--model", "fake-model", "--compare", second_url,
                   "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "3",
                   "-c", "1,2", "--plot", str(plot), "--endpoint", "/v1/chat/completions")
    assert [(run["url"], run["max_concurrency"]) for run in record["runs"]] == [
        (server_url, 1), (server_url, 2), (second_url, 1), (second_url, 2)]
    assert all(run["completed"] == 4 and run["output_tokens"] == 12 for run in record["runs"])
    assert plot.read_bytes().startswith(b"\x89PNG")

    assert main(["bench", "serve", "--url", server_url, "--compare", second_url, "--num-prompts", "2",
                 "--random-input-len", "4", "--random-output-len", "2", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "TTFT p99 ms" in table and server_url.removeprefix("http://") in table
    assert second_url.removeprefix("http://") in table


def test_time_bound_and_poisson_rate(capsys, server_url):
    record = bench(capsys, "--url", server_url, "--num-prompts", "50", "--random-input-len", "4",
                   "--random-output-len", "4", "--max-concurrency", "1", "--max-seconds", "0.2")
    run = record["runs"][0]
    assert 1 <= run["completed"] < 50 and run["failed"] == 0
    record = bench(capsys, "--url", server_url, "--num-prompts", "5", "--random-input-len", "4",
                   "--random-output-len", "2", "--request-rate", "50", "--output", "json")
    assert record["runs"][0]["completed"] == 5 and record["runs"][0]["request_rate"] == 50


def test_markdown_and_csv(capsys, server_url):
    assert main(["bench", "serve", "--url", server_url, "--num-prompts", "2", "--random-input-len", "4",
                 "--random-output-len", "2", "--no-progress", "--output", "md"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("| metric |") and "| output tok/s |" in markdown
    assert main(["bench", "serve", "--url", server_url, "--num-prompts", "2", "--random-input-len", "4",
                 "--random-output-len", "2", "--no-progress", "--output", "csv", "-c", "1,2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "ttft_p99_ms" in lines[0].split(",")


def test_sharegpt_dataset(capsys, server_url, tmp_path):
    conversations = [
        {"conversations": [{"from": "human", "value": f"question number {i} " * 3},
                           {"from": "gpt", "value": "answer " * (5 + i)}]} for i in range(6)
    ] + [{"conversations": [{"from": "human", "value": "too short"}]}, {"id": "no conversations"}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(conversations))
    record = bench(capsys, "--url", server_url, "--dataset", "sharegpt", "--dataset-path", str(path),
                   "--num-prompts", "4")
    run = record["runs"][0]
    assert run["completed"] == 4 and run["input_tokens"] == 4 * 9
    assert run["output_tokens"] >= 4 * 5  # the replies' lengths in tokens set max_tokens


def test_approximate_lengths_without_tokenize(second_url):
    tokenizer = datasets.ServerTokenizer(second_url, "fake-model")
    assert not tokenizer.available
    tokenizer.close()
    workload = datasets.random_workload(20, 100, 10, 0.5, None, seed=1)
    assert not workload.exact_lengths
    assert all(50 <= r.prompt_len <= 150 and 5 <= r.output_len <= 15 for r in workload.requests)
    assert len({r.prompt_len for r in workload.requests}) > 1


def test_vllm_style_tokenize():
    with FakeServer(fake_app(tokenize="prompt")) as url:
        tokenizer = datasets.ServerTokenizer(url, "fake-model")
        try:
            assert tokenizer.available and tokenizer("three little words") == 3
        finally:
            tokenizer.close()


def test_exact_lengths_with_a_multi_token_tokenizer():
    # words of 5+ letters count as two tokens: fitting must still land on the asked length (or next to it)
    def count(text: str) -> int:
        return sum(2 if len(word) >= 5 else 1 for word in text.split())

    workload = datasets.random_workload(10, 40, 8, 0.0, count, seed=3)
    assert all(abs(r.prompt_len - 40) <= 1 and r.prompt_len == count(r.prompt) for r in workload.requests)


def test_server_errors_are_reported(server_url):
    with pytest.raises(ServerError, match="404"):
        check_server(Target(server_url, "no-such-model", "fake"), RunSettings(), datasets.BenchRequest("hi", 1, 2))
    with pytest.raises(ServerError, match="cannot reach"):
        server_models("http://127.0.0.1:9")


def test_bad_options_are_one_line_errors(capsys, server_url):
    assert main(["bench", "serve", "--url", server_url, "--goodput", "latency:5"]) == 1
    assert "ttft, tpot or e2el" in capsys.readouterr().err
    assert main(["bench", "serve", "--url", server_url, "-c", "1,2", "--max-concurrency", "3"]) == 1
    assert main(["bench", "serve", "--url", server_url, "--dataset", "sharegpt"]) == 1
    assert "--dataset-path" in capsys.readouterr().err


def test_against_embers_own_server(capsys, tmp_path, tmp_path_factory):
    from tests.server_helpers import shared_server

    server = shared_server(tmp_path_factory)
    saved = tmp_path / "ember.json"
    record = bench(capsys, "--url", server.url, "--num-prompts", "4", "--random-input-len", "16",
                   "--random-output-len", "8", "-c", "1,4", "--save-result", str(saved))
    assert record["settings"]["exact_lengths"] is True  # ember's /tokenize counts the prompts
    for run in record["runs"]:
        assert (run["completed"], run["failed"]) == (4, 0)
        assert run["input_tokens"] == 4 * 17  # 16 random tokens, plus the BOS the server adds
        assert 4 <= run["output_tokens"] <= 4 * 8
        assert run["output_throughput"] > 0 and run["ttft_median_ms"] > 0
    for request in json.loads(saved.read_text())["runs"][1]["requests"]:
        if request["output_tokens"] > 1:
            tpot = (request["e2el"] - request["ttft"]) / (request["output_tokens"] - 1)
            assert tpot > 0 and request["ttft"] < request["e2el"]
            assert sum(request["itl"]) == pytest.approx(request["e2el"] - request["ttft"], abs=0.05)


def test_sse_lines_split_at_line_feeds_only():
    """A raw U+2028 / U+0085 inside an event (llama.cpp sends raw UTF-8) must not cut it."""
    from ember.bench.serve import _sse_lines

    class FakeResponse:
        async def aiter_bytes(self):
            body = 'data: {"text":"a\u2028b\x85c"}\r\n\ndata: [DONE]\n'.encode()
            for i in range(0, len(body), 7):  # arbitrary chunk boundaries, mid-character included
                yield body[i:i + 7]

    async def collect():
        return [line async for line in _sse_lines(FakeResponse())]

    lines = asyncio.run(collect())
    assert lines == ['data: {"text":"a\u2028b\x85c"}', "", "data: [DONE]"]


def test_server_events_are_ascii_escaped():
    from ember.server.openai_api import sse

    out = sse({"text": "a\u2028b\x85c"})
    assert out.isascii() and json.loads(out.removeprefix("data: "))["text"] == "a\u2028b\x85c"
