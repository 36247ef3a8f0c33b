"""Replay a workload against an OpenAI-compatible server, streaming every reply and timing each chunk.

Works with any server that speaks `/v1/completions` or `/v1/chat/completions` with SSE streaming:
ember, llama.cpp's server, Ollama, vLLM, LM Studio. Requests arrive as a Poisson process at
`request_rate` (or all at once for inf), at most `max_concurrency` in flight; issuing stops after
`max_seconds`, and requests already sent are allowed to finish so none is cut short mid-measurement.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from ember.bench.datasets import BenchRequest, Workload
from ember.bench.metrics import RequestResult
from ember.errors import EmberError


class ServerError(EmberError):
    """The benchmarked server cannot be reached or refuses the benchmark's requests."""


@dataclass
class Target:
    base_url: str  # scheme://host:port, without /v1
    model: str
    label: str


@dataclass
class RunSettings:
    endpoint: str = "/v1/completions"
    request_rate: float = math.inf
    max_concurrency: int | None = None
    max_seconds: float | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout: float = 600.0
    seed: int = 0

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")


def base_url(url: str) -> str:
    """Accept http://host:port, http://host:port/ and http://host:port/v1 alike."""
    url = url.strip().rstrip("/")
    if not urlsplit(url).scheme:
        url = "http://" + url
    return url.removesuffix("/v1")


def server_models(url: str, timeout: float = 10.0) -> list[str]:
    try:
        response = httpx.get(f"{url}/v1/models", timeout=timeout)
    except httpx.HTTPError as err:
        raise ServerError(f"cannot reach {url}: {err}") from None
    if response.status_code != 200:
        return []
    try:
        return [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]
    except (ValueError, AttributeError):
        return []


def _payload(target: Target, settings: RunSettings, request: BenchRequest) -> dict:
    body = {
        "model": target.model, "max_tokens": request.output_len, "temperature": settings.temperature,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if settings.ignore_eos:
        body["ignore_eos"] = True  # vLLM, llama.cpp and ember honour it; others ignore it
    if settings.chat:
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body


def _chunk_text(event: dict, chat: bool) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if not chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    # Reasoning models stream their thinking separately; it is generated tokens all the same.
    return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")


async def _sse_lines(response: httpx.Response):
    """The stream's lines, split at LF only (SSE's CRLF/LF; CR is stripped): servers that send raw UTF-8 may
    emit U+2028 or U+0085 inside a JSON string, where str.splitlines-style splitting would cut an event."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", "replace")
    if buffer:
        yield buffer.rstrip(b"\r").decode("utf-8", "replace")


async def stream_request(client: httpx.AsyncClient, target: Target, settings: RunSettings,
                         request: BenchRequest) -> RequestResult:
    result = RequestResult(ok=False, prompt_len=request.prompt_len)
    chunks, usage_tokens = 0, None
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", target.base_url + settings.endpoint,
                                 json=_payload(target, settings, request)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                return result
            async for line in _sse_lines(response):
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):
                    result.error = str(event["error"])[:200]
                    return result
                now = time.perf_counter()
                if _chunk_text(event, settings.chat):
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    chunks += 1
                    last = now
                usage = event.get("usage")
                if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
                    # The server's own count includes BOS and any chat template around the prompt.
                    result.prompt_len = int(usage.get("prompt_tokens") or result.prompt_len)
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        result.error = f"{type(err).__name__}: {err}"[:200]
        return result
    result.latency = time.perf_counter() - start
    # Servers that report usage count tokens exactly; otherwise one chunk is taken as one token.
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    result.ok = chunks > 0
    if not result.ok:
        result.error = "the stream carried no text"
    return result


async def _run(target: Target, workload: Workload, settings: RunSettings,
               on_done: Callable[[], None] | None) -> tuple[list[RequestResult], float]:
    limit = settings.max_concurrency or len(workload.requests)
    semaphore = asyncio.Semaphore(limit)
    rng = random.Random(settings.seed)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(timeout=settings.timeout, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + settings.max_seconds if settings.max_seconds else math.inf

        async def one(request: BenchRequest) -> RequestResult | None:
            async with semaphore:
                if time.perf_counter() >= deadline:
                    return None  # queued behind the concurrency limit past the time bound: not sent
                result = await stream_request(client, target, settings, request)
            if on_done:
                on_done()
            return result

        tasks = []
        for request in workload.requests:
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(one(request)))
            if math.isfinite(settings.request_rate):
                await asyncio.sleep(rng.expovariate(settings.request_rate))
        results = [r for r in await asyncio.gather(*tasks) if r is not None]
        return results, time.perf_counter() - start


def check_server(target: Target, settings: RunSettings, request: BenchRequest) -> None:
    """Send one request first so a wrong URL, model or endpoint fails in a second, with the reason."""

    async def probe() -> RequestResult:
        async with httpx.AsyncClient(timeout=settings.timeout) as client:
            return await stream_request(client, target, settings, request)

    result = asyncio.run(probe())
    if not result.ok:
        raise ServerError(f"{target.label}: the test request failed: {result.error}")


def run_workload(target: Target, workload: Workload, settings: RunSettings,
                 on_done: Callable[[], None] | None = None) -> tuple[list[RequestResult], float]:
    """Results of the requests sent, and the run's wall-clock duration in seconds."""
    return asyncio.run(_run(target, workload, settings, on_done))
