"""Soak test of `ember serve`: many concurrent streaming clients, faults mixed in, leak and stability checks.

    python benchmarks/soak.py                                   # 200 clients, 10 minutes, the bundled model
    python benchmarks/soak.py --clients 40 --duration 20 --window 5 --rss-from 8 --sigterm
    python benchmarks/soak.py --url http://127.0.0.1:8080 --pid 1234   # a server already running

Starts `ember serve` (the bundled model unless --model) or targets --url, then runs --clients workers until
--duration has passed. Each worker loops over requests spread across /v1/chat/completions, /v1/completions and
/v1/responses (streamed), /api/chat, /api/generate (Ollama's line streams) and /v1/embeddings:
  * --disconnect (25 %) of the streams are dropped at a random point (before or after some chunks);
  * --garbage (5 %) of the requests are malformed: broken or deeply nested JSON, wrong types, bodies over the
    server's limit (sized or chunked), invalid UTF-8; each must get a 4xx;
  * --limits (5 %) probe the limits a client controls (n, max_tokens, stop lists, prompt length, inputs):
    one past a limit must get a 4xx, one at it a full answer;
  * the rest are well-behaved: their streams must end properly (OpenAI `[DONE]`, Ollama `done`, Responses
    `response.completed` or `.incomplete`); their time to first token and total time are kept per --window.
Every --sample seconds /metrics and the server process (psutil: RSS, threads, open fds) are sampled.

Afterwards (exit status 1 if any check fails):
  * no 5xx, no dropped connection, no malformed stream (503 queue_full, the server shedding load, is counted
    apart and allowed);
  * once idle: KV blocks in use 0, nothing running or waiting, event-loop tasks (ember_asyncio_tasks) and
    threads (psutil) no more than in the idle baseline taken after a warm-up;
  * RSS grows less than --rss-growth (5 %) from --rss-from seconds (minute 2) on (its peak after, to the end);
  * p99 stable: the last window's p99 total latency at most --p99-factor (1.5) times the second window's;
  * --sigterm: streams in flight on every streaming endpoint when SIGTERM arrives all end properly, and the
    server exits 0 within --grace (its --shutdown-grace) plus a margin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from ember.sampling_params import MAX_N, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_TOKENS_LIMIT
from ember.server.protocol import MAX_PROMPTS

WORDS = ("the river ember spark stone quiet lamp north garden winter copper bright paper window market song "
         "seven cloud thread mountain signal harbor").split()
STREAMING = ("chat", "completions", "responses", "ollama_chat", "ollama_generate")
ENDPOINTS = (*STREAMING, "embeddings")
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "responses": "/v1/responses",
         "ollama_chat": "/api/chat", "ollama_generate": "/api/generate", "embeddings": "/v1/embeddings"}


@dataclass
class SoakConfig:
    clients: int = 200
    duration: float = 600.0
    disconnect: float = 0.25
    garbage: float = 0.05
    limits: float = 0.05
    max_tokens: int = 48
    sample_every: float = 5.0
    window: float = 60.0
    rss_from: float = 120.0
    rss_growth: float = 0.05
    p99_factor: float = 1.5
    max_body: int = 4 * 2**20
    sigterm: bool = False
    grace: float = 5.0
    seed: int = 0


@dataclass
class Outcome:
    kind: str  # good, disconnect, garbage, limit
    endpoint: str
    started: float  # seconds since the load began
    status: int | None = None
    ttft: float | None = None
    total: float | None = None
    problem: str | None = None  # why this outcome fails the soak


@dataclass
class Sample:
    at: float
    rss: int
    threads: int
    fds: int
    metrics: dict[str, float]


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    baseline: dict[str, float] = field(default_factory=dict)
    idle: dict[str, float] = field(default_factory=dict)
    windows: list[dict] = field(default_factory=list)
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)
    sigterm: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.checks.values())


# --- requests ------------------------------------------------------------------------------------------------
def _prompt(rng: random.Random, words: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words or rng.randint(3, 30)))


def good_body(endpoint: str, model: str, rng: random.Random, max_tokens: int, **extra) -> dict:
    """A well-formed request for `endpoint`, streamed where the endpoint streams; `extra` overrides the
    OpenAI-style fields (max_tokens, n, stop) and is mapped to Ollama's options."""
    text = _prompt(rng)
    tokens = extra.pop("max_tokens", max_tokens)
    sampling = {"temperature": rng.choice((0.0, 0.7, 1.0)), "seed": rng.randrange(1000)}
    if endpoint == "chat":
        return {"model": model, "messages": [{"role": "user", "content": text}], "stream": True,
                "max_tokens": tokens, **sampling, **extra}
    if endpoint == "completions":
        return {"model": model, "prompt": text, "stream": True, "max_tokens": tokens, **sampling, **extra}
    if endpoint == "responses":
        return {"model": model, "input": text, "stream": True, "max_output_tokens": max(tokens, 16),
                "temperature": sampling["temperature"], **extra}
    if endpoint == "embeddings":
        return {"model": model, "input": [text] * rng.randint(1, 4), **extra}
    options = {"num_predict": tokens, **sampling, **({"stop": extra.pop("stop")} if "stop" in extra else {})}
    if endpoint == "ollama_chat":
        return {"model": model, "messages": [{"role": "user", "content": text}], "options": options, **extra}
    return {"model": model, "prompt": text, "options": options, **extra}


def _has_token(endpoint: str, event: dict) -> bool:
    if endpoint == "chat":
        return any((c.get("delta") or {}).get("content") for c in event.get("choices", []))
    if endpoint == "completions":
        return any(c.get("text") for c in event.get("choices", []))
    if endpoint == "responses":
        return event.get("type") == "response.output_text.delta"
    if endpoint == "ollama_chat":
        return bool((event.get("message") or {}).get("content"))
    return bool(event.get("response"))


def _events(endpoint: str, line: str) -> tuple[dict | None, bool]:
    """(the JSON event a stream line carries or None, whether the line ends the stream properly)."""
    if endpoint.startswith("ollama"):
        event = json.loads(line) if line.strip() else None
        return event, bool(event and event.get("done"))
    if not line.startswith("data: "):
        return None, False
    if line == "data: [DONE]":
        return None, True
    event = json.loads(line[6:])
    return event, endpoint == "responses" and event.get("type") in ("response.completed", "response.incomplete")


async def _stream(client: httpx.AsyncClient, endpoint: str, body: dict, began: float,
                  drop_after: int | None = None) -> Outcome:
    """Send a streaming request; read to its end, or drop the connection after `drop_after` lines."""
    outcome = Outcome("good" if drop_after is None else "disconnect", endpoint, 0.0)
    start = time.monotonic()
    outcome.started = start - began
    async with client.stream("POST", PATHS[endpoint], json=body) as response:
        outcome.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            return outcome
        ended, lines = False, 0
        async for line in response.aiter_lines():
            if drop_after is not None and lines >= drop_after:
                return outcome  # leaving the block closes the connection mid-stream
            lines += 1
            event, end = _events(endpoint, line)
            if event is not None and ("error" in event or event.get("type") in ("error", "response.failed")):
                outcome.problem = f"error event in the stream: {line[:200]}"
            if event is not None and outcome.ttft is None and _has_token(endpoint, event):
                outcome.ttft = time.monotonic() - start
            ended = ended or end
    outcome.total = time.monotonic() - start
    outcome.ttft = outcome.total if outcome.ttft is None else outcome.ttft
    if drop_after is None and not ended and outcome.problem is None:
        outcome.problem = "the stream ended without its terminator"
    return outcome


async def good_request(client: httpx.AsyncClient, endpoint: str, model: str, rng: random.Random, began: float,
                       max_tokens: int) -> Outcome:
    body = good_body(endpoint, model, rng, max_tokens)
    if endpoint != "embeddings":
        return await _stream(client, endpoint, body, began)
    start = time.monotonic()
    response = await client.post(PATHS[endpoint], json=body)
    total = time.monotonic() - start
    outcome = Outcome("good", endpoint, start - began, response.status_code, total, total)
    if response.status_code == 200 and len(response.json()["data"]) != len(body["input"]):
        outcome.problem = "embeddings: one vector per input expected"
    return outcome


async def disconnect_request(client: httpx.AsyncClient, endpoint: str, model: str, rng: random.Random,
                             began: float, max_tokens: int) -> Outcome:
    """A stream dropped after 0-8 lines, or before its headers (a request cancelled after a short wait)."""
    body = good_body(endpoint, model, rng, max_tokens * 4)
    if rng.random() < 0.2:
        outcome = Outcome("disconnect", endpoint, time.monotonic() - began)
        try:
            await asyncio.wait_for(_stream(client, endpoint, body, began), rng.uniform(0.0, 0.3))
        except TimeoutError:
            pass
        return outcome
    return await _stream(client, endpoint, body, began, drop_after=rng.randint(0, 8))


def garbage_bodies(model: str, max_body: int) -> dict[str, Callable[[str], dict]]:
    """Malformed requests by name: each gives httpx.request keyword arguments for an endpoint. The broken
    characters go into an otherwise good body of that endpoint, so that they, not a missing field, are what the
    server must refuse."""
    over = b'{"prompt": "' + b"a" * (max_body + 1) + b'"}'
    as_json = {"content-type": "application/json"}

    async def chunked():  # no Content-Length: the server must stop reading at its limit
        for _ in range(0, len(over), 2**16):
            yield b"a" * 2**16

    def with_text(raw: bytes) -> Callable[[str], dict]:
        def make(endpoint: str) -> dict:
            body = good_body(endpoint, model, random.Random(0), 4)
            text = json.dumps(body).encode()
            for value in (body.get("prompt"), body.get("input"), *(m["content"] for m in body.get("messages", []))):
                for piece in value if isinstance(value, list) else [value] if value else []:
                    text = text.replace(json.dumps(piece).encode(), b'"a ' + raw + b' b"')
            return {"content": text, "headers": as_json}
        return make

    return {
        "truncated JSON": lambda endpoint: {"content": b'{"model": "' + model.encode() + b'", "messages": [{"role": '},
        "not JSON": lambda endpoint: {"content": b"hello, server", "headers": as_json},
        "JSON array": lambda endpoint: {"json": [1, 2, 3]},
        "deeply nested JSON": lambda endpoint: {"content": b"[" * 100_000 + b"]" * 100_000, "headers": as_json},
        "wrong types": lambda endpoint: {"json": {"model": 7, "messages": "hi", "prompt": {"a": 1}, "input": 3.5,
                                                  "max_tokens": "ten", "stream": "yes", "options": [1]}},
        "invalid UTF-8": with_text(b"\xff\xfe\xc3\x28"),
        "lone UTF-16 surrogate": with_text(b"\\ud800"),
        "body over the limit": lambda endpoint: {"content": over, "headers": as_json},
        "chunked body over the limit": lambda endpoint: {"content": chunked(), "headers": as_json},
    }


async def garbage_request(client: httpx.AsyncClient, endpoint: str, model: str, rng: random.Random,
                          began: float, max_body: int) -> Outcome:
    name, make = rng.choice(list(garbage_bodies(model, max_body).items()))
    outcome = Outcome("garbage", endpoint, time.monotonic() - began)
    try:
        response = await client.post(PATHS[endpoint], **make(endpoint))
    except (httpx.WriteError, httpx.RemoteProtocolError) as err:
        # A body over the limit may still be on its way when the 413 and the close arrive: the client cannot
        # always read the answer, which is the server keeping its limit, not a fault.
        if "over the limit" not in name:
            outcome.problem = f"{name}: {type(err).__name__} {err}"
        return outcome
    outcome.status = response.status_code
    if not 400 <= response.status_code < 500:
        outcome.problem = f"{name} on {endpoint}: {response.status_code} {response.text[:200]}"
    elif "error" not in response.json():
        outcome.problem = f"{name} on {endpoint}: a 4xx without an error body"
    return outcome


def limit_probes(model: str, rng: random.Random) -> list[tuple[str, str, dict, bool]]:
    """(name, endpoint, body, whether it is within the limits): one past a limit must be refused with a 4xx,
    one at it must be answered."""
    long_stop = ["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS
    return [
        ("n over the limit", "chat", good_body("chat", model, rng, 4, n=MAX_N + 1), False),
        ("n at the limit", "chat", good_body("chat", model, rng, 2, n=MAX_N), True),
        ("max_tokens over the limit", "completions", good_body("completions", model, rng, MAX_TOKENS_LIMIT + 1),
         False),
        ("stop list over the limit", "chat", good_body("chat", model, rng, 4, stop=["a"] * (MAX_STOP_STRINGS + 1)),
         False),
        ("stop list at the limit", "completions", good_body("completions", model, rng, 4, stop=long_stop), True),
        ("stop string too long", "completions",
         good_body("completions", model, rng, 4, stop=["x" * (MAX_STOP_STRING_CHARS + 1)]), False),
        ("Ollama stop list over the limit", "ollama_generate",
         good_body("ollama_generate", model, rng, 4, stop=["a"] * (MAX_STOP_STRINGS + 1)), False),
        ("prompt longer than the context", "completions",
         {**good_body("completions", model, rng, 4), "prompt": _prompt(rng, 20_000)}, False),
        ("embedding inputs over the limit", "embeddings",
         good_body("embeddings", model, rng, 4, input=["a"] * (MAX_PROMPTS + 1)), False),
    ]


async def limit_request(client: httpx.AsyncClient, model: str, rng: random.Random, began: float) -> Outcome:
    name, endpoint, body, allowed = rng.choice(limit_probes(model, rng))
    outcome = Outcome("limit", endpoint, time.monotonic() - began)
    if allowed:
        streamed = await _stream(client, endpoint, body, began)
        outcome.status, outcome.problem = streamed.status, streamed.problem
        if streamed.status != 200 and streamed.status != 503:
            outcome.problem = f"{name}: {streamed.status}, a full answer expected"
        return outcome
    response = await client.post(PATHS[endpoint], json=body)
    outcome.status = response.status_code
    if not 400 <= response.status_code < 500:
        outcome.problem = f"{name}: {response.status_code} {response.text[:200]}, a 4xx expected"
    return outcome


def judge(outcome: Outcome) -> Outcome:
    """A 5xx other than load shedding fails the soak, whatever the request."""
    if outcome.status is not None and outcome.status >= 500 and outcome.status != 503 and outcome.problem is None:
        outcome.problem = f"{outcome.kind} {outcome.endpoint}: status {outcome.status}"
    if outcome.kind == "good" and outcome.status not in (200, 503) and outcome.problem is None:
        outcome.problem = f"good {outcome.endpoint}: status {outcome.status}"
    return outcome


async def worker(url: str, model: str, config: SoakConfig, rng: random.Random, began: float, deadline: float,
                 outcomes: list[Outcome]) -> None:
    timeout = httpx.Timeout(120.0, connect=30.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        while time.monotonic() < deadline:
            roll = rng.random()
            endpoint = rng.choice(ENDPOINTS)
            try:
                if roll < config.garbage:
                    outcome = await garbage_request(client, endpoint, model, rng, began, config.max_body)
                elif roll < config.garbage + config.limits:
                    outcome = await limit_request(client, model, rng, began)
                elif roll < config.garbage + config.limits + config.disconnect:
                    outcome = await disconnect_request(client, rng.choice(STREAMING), model, rng, began,
                                                       config.max_tokens)
                else:
                    outcome = await good_request(client, endpoint, model, rng, began, config.max_tokens)
            except (httpx.HTTPError, ValueError, KeyError) as err:  # ValueError, KeyError: an unreadable answer
                outcome = Outcome("error", endpoint, time.monotonic() - began,
                                  problem=f"{endpoint}: {type(err).__name__} {err}")
            outcomes.append(judge(outcome))


# --- the server and its samples -----------------------------------------------------------------------------
def start_server(model: str | None, extra: list[str], timeout: float = 300) -> tuple[subprocess.Popen, str, Path]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = Path(tempfile.mkdtemp(prefix="ember-soak-")) / "serve.log"
    command = [sys.executable, "-m", "ember.cli.main", "serve", *([model] if model else []), "--host", "127.0.0.1",
               "--port", str(port), *extra]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"ember serve exited with {process.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"ember serve did not become healthy within {timeout} s")


async def read_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    """The gauges the checks need, summed over models."""
    wanted = {"ember_kv_blocks_used", "ember_kv_blocks_total", "ember_requests_running", "ember_requests_waiting", "ember_asyncio_tasks",
              "ember_threads", "process_open_fds", "process_resident_memory_bytes"}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families((await client.get("/metrics")).text):
        for sample in family.samples:
            if sample.name in wanted:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


async def sample(client: httpx.AsyncClient, process: psutil.Process, at: float) -> Sample:
    metrics = await read_metrics(client)
    return Sample(at, process.memory_info().rss, process.num_threads(), process.num_fds(), metrics)


async def sampler(url: str, process: psutil.Process, began: float, every: float, stop: asyncio.Event,
                  samples: list[Sample]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while True:
            samples.append(await sample(client, process, time.monotonic() - began))
            if stop.is_set():
                return  # the last sample: the end of the load
            try:
                await asyncio.wait_for(stop.wait(), every)
            except TimeoutError:
                pass


async def idle_state(url: str, process: psutil.Process, baseline: dict[str, float] | None,
                     timeout: float = 60.0) -> dict[str, float]:
    """Wait until nothing runs, no KV block is used and (given a baseline) the tasks and threads are back to
    it; the last reading either way."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        deadline = time.monotonic() + timeout
        while True:
            reading = await sample(client, process, 0.0)
            state = {**reading.metrics, "threads": reading.threads, "fds": reading.fds, "rss": reading.rss}
            settled = (state.get("ember_kv_blocks_used", 1) == 0 and state.get("ember_requests_running", 1) == 0
                       and state.get("ember_requests_waiting", 1) == 0)
            if baseline is not None:
                settled = settled and all(state[k] <= baseline[k] for k in ("ember_asyncio_tasks", "threads"))
            if settled or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.5)


# --- SIGTERM with streams in flight ---------------------------------------------------------------------------
async def sigterm_phase(url: str, model: str, process: subprocess.Popen, grace: float, rng: random.Random) -> dict:
    """Two streams per streaming endpoint (one short, one longer than the grace period), SIGTERM once each has
    sent a line; every stream must end properly, and the server must exit 0 within the grace period."""
    first_lines: list[asyncio.Event] = []
    ends: list[str] = []

    async def one(endpoint: str, max_tokens: int) -> None:
        body = good_body(endpoint, model, rng, max_tokens)
        if endpoint == "responses":
            body["max_output_tokens"] = max_tokens
        seen = asyncio.Event()
        first_lines.append(seen)
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(grace + 60)) as client, \
                client.stream("POST", PATHS[endpoint], json=body) as response:
            ended = False
            async for line in response.aiter_lines():
                seen.set()
                ended = ended or _events(endpoint, line)[1]
            ends.append("ended" if ended and response.status_code == 200 else f"cut ({response.status_code})")
            seen.set()

    streams = [asyncio.create_task(one(e, tokens)) for e in STREAMING for tokens in (16, 4000)]
    await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_lines)), 120)
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    results = await asyncio.gather(*streams, return_exceptions=True)
    code = await asyncio.to_thread(process.wait, grace + 60)
    return {"exit_code": code, "exit_seconds": round(time.monotonic() - began, 2), "streams": len(streams),
            "ended": ends.count("ended"),
            "failed": [repr(r) for r in results if isinstance(r, BaseException)] + [e for e in ends if e != "ended"]}


# --- the run and its checks ------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_windows(outcomes: list[Outcome], window: float) -> list[dict]:
    """p50/p99 of TTFT and total time of the well-behaved streams, by the window they started in."""
    buckets: dict[int, list[Outcome]] = {}
    for o in outcomes:
        if o.kind == "good" and o.status == 200 and o.total is not None and o.problem is None:
            buckets.setdefault(int(o.started // window), []).append(o)
    rows = []
    for index in sorted(buckets):
        done = buckets[index]
        ttft, total = [o.ttft for o in done], [o.total for o in done]
        rows.append({"window": index + 1, "requests": len(done),
                     "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
                     "total_p50": percentile(total, 0.5), "total_p99": percentile(total, 0.99)})
    return rows


def check(report: Report, config: SoakConfig) -> None:
    problems = [o.problem for o in report.outcomes if o.problem]
    report.checks["no 5xx, dropped connection or bad stream"] = (
        not problems, f"{len(problems)} problem(s)" + (f", first: {problems[0]}" if problems else ""))
    garbage = [o for o in report.outcomes if o.kind == "garbage"]
    report.checks["garbage answered 4xx"] = (
        all(o.problem is None for o in garbage), f"{len(garbage)} garbage request(s)")
    idle, base = report.idle, report.baseline
    report.checks["KV blocks in use 0 once idle"] = (
        idle.get("ember_kv_blocks_used") == 0 and idle.get("ember_requests_running") == 0
        and idle.get("ember_requests_waiting") == 0,
        f"kv_blocks_used {idle.get('ember_kv_blocks_used')}, running {idle.get('ember_requests_running')}, "
        f"waiting {idle.get('ember_requests_waiting')}")
    report.checks["no leaked asyncio tasks"] = (
        idle.get("ember_asyncio_tasks", 1e9) <= base["ember_asyncio_tasks"],
        f"{idle.get('ember_asyncio_tasks'):.0f} idle after vs {base['ember_asyncio_tasks']:.0f} idle before")
    report.checks["no leaked threads"] = (
        idle["threads"] <= base["threads"], f"{idle['threads']:.0f} after vs {base['threads']:.0f} before")
    reference = next((s for s in report.samples if s.at >= config.rss_from), None)
    if reference is not None and report.samples[-1].at > reference.at:
        peak = max(s.rss for s in report.samples if s.at > reference.at)  # the load's end may already free some
        growth = peak / reference.rss - 1
        report.checks["RSS growth"] = (
            growth < config.rss_growth,
            f"peak {growth * 100:+.1f} % over {reference.rss / 2**20:.0f} MiB at {reference.at:.0f} s "
            f"({peak / 2**20:.0f} MiB); {report.samples[-1].rss / 2**20:.0f} MiB at the end of the load")
    else:
        report.checks["RSS growth"] = (False, f"no sample after {config.rss_from} s to compare")
    rows = report.windows
    if len(rows) >= 3:
        second, last = rows[1]["total_p99"], rows[-1]["total_p99"]
        report.checks["p99 stable"] = (
            last <= config.p99_factor * second,
            f"last window p99 {last:.3f} s vs second window {second:.3f} s (limit x{config.p99_factor})")
    else:
        report.checks["p99 stable"] = (False, f"{len(rows)} window(s): at least 3 needed")
    if config.sigterm:
        s = report.sigterm
        report.checks["SIGTERM drains and exits 0"] = (
            s.get("exit_code") == 0 and not s.get("failed") and s.get("exit_seconds", 1e9) <= config.grace + 10,
            f"exit {s.get('exit_code')} after {s.get('exit_seconds')} s, {s.get('ended')}/{s.get('streams')} "
            f"streams ended properly" + (f", failed: {s['failed']}" if s.get("failed") else ""))


async def fill_kv_cache(client: httpx.AsyncClient, model: str, rng: random.Random, block_size: int = 16) -> None:
    """Write every KV block once. The cache is an anonymous memory map whose pages the OS commits on first
    write (ember.engine.model_runner), and freed blocks keep their cached prefix as long as unused ones are
    left: under any load RSS climbs until the whole cache has been written once, which is no leak. Prompts of
    nearly a full context, distinct, a quarter more tokens than the cache holds (at the engine's default
    `block_size`), `total_slots` at a time."""
    props = (await client.get("/props")).json()
    context, slots = props["default_generation_settings"]["n_ctx"], props["total_slots"]
    blocks = (await read_metrics(client))["ember_kv_blocks_total"]
    length = context - 8
    prompts = int(blocks * block_size * 1.25 // length) + 1
    for start in range(0, prompts, slots):
        batch = []
        for _ in range(min(slots, prompts - start)):
            ids = (await client.post("/tokenize", json={"content": _prompt(rng, length)})).json()["tokens"]
            batch.append(client.post("/v1/completions", json={"model": model, "prompt": ids[:length],
                                                              "max_tokens": 1}))
        for response in await asyncio.gather(*batch):
            response.raise_for_status()


async def warm_up(url: str, model: str, rng: random.Random) -> None:
    """Every endpoint, several at a time, so lazily started threads and pools exist before the baseline; and
    the KV cache written once."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await fill_kv_cache(client, model, rng)
        for _ in range(2):
            await asyncio.gather(*(good_request(client, e, model, rng, time.monotonic(), 8)
                                   for e in ENDPOINTS for _ in range(4)))


async def soak(url: str, pid: int, config: SoakConfig, server: subprocess.Popen | None = None,
               log: Callable[[str], None] = print) -> Report:
    """Run the soak against `url` (server process `pid`; `server` is needed for --sigterm) and check it."""
    rng = random.Random(config.seed)
    process = psutil.Process(pid)
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    report = Report()
    await warm_up(url, model, rng)
    report.baseline = await idle_state(url, process, None)
    log(f"baseline: {fmt_state(report.baseline)}")
    began = time.monotonic()
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler(url, process, began, config.sample_every, stop, report.samples))
    deadline = began + config.duration
    workers = [worker(url, model, config, random.Random(rng.random()), began, deadline, report.outcomes)
               for _ in range(config.clients)]
    progress = asyncio.create_task(_progress(report, began, config, log))
    await asyncio.gather(*workers)
    progress.cancel()
    stop.set()
    await sampling
    report.idle = await idle_state(url, process, report.baseline)
    log(f"idle after: {fmt_state(report.idle)}")
    report.windows = latency_windows(report.outcomes, config.window)
    if config.sigterm and server is not None:
        report.sigterm = await sigterm_phase(url, model, server, config.grace, rng)
    check(report, config)
    return report


async def _progress(report: Report, began: float, config: SoakConfig, log: Callable[[str], None]) -> None:
    while True:
        await asyncio.sleep(max(config.window, 10))
        last = report.samples[-1] if report.samples else None
        done = len(report.outcomes)
        memory = f", RSS {last.rss / 2**20:.0f} MiB, threads {last.threads}, fds {last.fds}" if last else ""
        log(f"{time.monotonic() - began:6.0f} s: {done} requests, "
            f"{sum(1 for o in report.outcomes if o.problem)} problems{memory}")


def fmt_state(state: dict[str, float]) -> str:
    return (f"kv_blocks_used {state.get('ember_kv_blocks_used', '?'):.0f}, "
            f"asyncio tasks {state.get('ember_asyncio_tasks', float('nan')):.0f}, "
            f"python threads {state.get('ember_threads', float('nan')):.0f}, process threads {state['threads']}, "
            f"fds {state['fds']}, RSS {state['rss'] / 2**20:.0f} MiB")


def summary(report: Report) -> str:
    kinds: dict[str, int] = {}
    for o in report.outcomes:
        kinds[o.kind] = kinds.get(o.kind, 0) + 1
    shed = sum(1 for o in report.outcomes if o.status == 503)
    lines = [f"requests: {len(report.outcomes)} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
             f"503 (queue full) {shed}",
             "window  requests  TTFT p50  TTFT p99  total p50  total p99"]
    lines += [f"{r['window']:6d}  {r['requests']:8d}  {r['ttft_p50']:7.3f}s  {r['ttft_p99']:7.3f}s  "
              f"{r['total_p50']:8.3f}s  {r['total_p99']:8.3f}s" for r in report.windows]
    lines += [f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}" for name, (ok, detail) in report.checks.items()]
    problems: dict[str, int] = {}
    for o in report.outcomes:
        if o.problem:
            key = f"{o.kind} {o.endpoint}: {o.problem}"
            problems[key] = problems.get(key, 0) + 1
    lines += [f"  {count} x {problem}" for problem, count in sorted(problems.items())]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server to soak (default: start `ember serve`)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id (for RSS, threads, fds)")
    parser.add_argument("--model", help="the model to serve (default: the bundled one)")
    parser.add_argument("--serve-args", default="", help="more `ember serve` arguments, e.g. '--max-num-seqs 64'")
    defaults = SoakConfig()
    for name, value in vars(defaults).items():
        if name == "sigterm":
            parser.add_argument("--sigterm", action="store_true",
                                help="after the checks, SIGTERM the server with streams in flight")
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    config = SoakConfig(**{name: getattr(args, name) for name in vars(defaults)})
    server = None
    if args.url:
        if args.pid is None or config.sigterm:
            parser.error("--url needs --pid (the server process, sampled with psutil) and cannot --sigterm")
        url, pid = args.url, args.pid
    else:
        extra = ["--shutdown-grace", str(config.grace), "--max-body", str(config.max_body), *args.serve_args.split()]
        server, url, _ = start_server(args.model, extra)
        pid = server.pid
    print(f"soak: {config.clients} clients for {config.duration:.0f} s on {url}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    try:
        report = asyncio.run(soak(url, pid, config, server, log=lambda m: print(m, flush=True)))
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    print(summary(report))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"windows": report.windows, "checks": report.checks,
                                               "samples": [vars(s) for s in report.samples],
                                               "sigterm": report.sigterm, "baseline": report.baseline,
                                               "idle": report.idle}, indent=1))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
