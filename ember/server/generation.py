"""Run one API request as engine requests: n samples per prompt, merged into one stream of (choice index,
output), with the queue limit, in-flight tracking, latency metrics and abort on every early exit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import TypeVar

from starlette.requests import Request

from ember.engine.async_engine import AsyncEngine
from ember.engine.outputs import StepOutput, TokenLogprob
from ember.errors import EmberError
from ember.sampling_params import SamplingParams
from ember.server.errors import APIError, from_exception
from ember.server.state import ModelEntry, ServerState

T = TypeVar("T")


@dataclass
class Choice:
    """A finished (or aborted) choice, accumulated from its stream."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id behind finish_reason "stop"
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token_at: float | None = None

    def add(self, out: StepOutput) -> None:
        self.text += out.text_delta
        self.token_ids.extend(out.token_ids)
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        if out.token_ids and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens
        self.cached_tokens = out.cached_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


@dataclass
class Generation:
    """An admitted request: `stream()` yields (choice index, output) for every choice, interleaved."""

    state: ServerState
    model: str
    engine: AsyncEngine
    prompts: list[list[int]]
    params: SamplingParams
    prefix: str
    started: float = field(default_factory=time.monotonic)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n

    def prompt_of(self, index: int) -> int:
        return index // self.params.n

    async def stream(self) -> AsyncIterator[tuple[int, StepOutput]]:
        queue: asyncio.Queue[tuple[int, StepOutput | BaseException]] = asyncio.Queue()
        base = self.state.new_id(self.prefix)
        tasks = []
        for index in range(self.num_choices):
            sample = index % self.params.n
            seed = None if self.params.seed is None else self.params.seed + sample
            params = replace(self.params, n=1, seed=seed)
            tasks.append(asyncio.create_task(
                self._pump(f"{base}-{index}", index, self.prompts[self.prompt_of(index)], params, queue)))
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, request_id: str, index: int, prompt: list[int], params: SamplingParams,
                    queue: asyncio.Queue) -> None:
        metrics = self.state.metrics
        self.state.track(request_id, self.engine)
        last = None
        try:
            async with aclosing(self.engine.generate(request_id, prompt, params)) as outputs:
                async for out in outputs:
                    now = time.monotonic()
                    if out.token_ids:
                        if last is None:
                            metrics.ttft.labels(self.model).observe(now - self.started)
                        else:
                            metrics.itl.labels(self.model).observe((now - last) / len(out.token_ids))
                        last = now
                    if out.finished:
                        metrics.e2e.labels(self.model).observe(now - self.started)
                    queue.put_nowait((index, out))
        except asyncio.CancelledError:
            raise
        except Exception as err:
            queue.put_nowait((index, err))
        finally:
            self.state.untrack(request_id)


def validate(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> None:
    """The engine's own up-front check (prompt length against the context, token ids, vocab-bound params)."""
    check = getattr(engine, "validate", None) or engine.engine.validate
    check(prompt, params)


def start_generation(request: Request, entry: ModelEntry, prompts: list[list[int]], params: SamplingParams,
                     prefix: str) -> Generation:
    """Validate and admit a request on a model it holds (raising the 4xx/503 before any byte is sent)."""
    state: ServerState = request.app.state.ember
    if params.seed is not None and params.n > 1:
        replace(params, n=1, seed=params.seed + params.n - 1)  # sample i uses seed + i: check the last one fits
    if entry.lora is not None:
        params = replace(params, lora=entry.lora)
    for prompt in prompts:
        validate(entry.engine, prompt, params)
    state.admit(request.scope, entry.engine, len(prompts) * params.n)
    return Generation(state, entry.name, entry.engine, prompts, params, prefix)


async def wait_for_disconnect(request: Request) -> None:
    """Returns once the client has gone (the body has been read already, so the next message is the close)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def drive(generation: Generation, render: Callable[[int, StepOutput, list[Choice]], Iterable[T]],
                error: Callable[[APIError], Iterable[T]], finish: Callable[[list[Choice]], Iterable[T]]
                ) -> AsyncIterator[T]:
    """The one streaming driver every API's stream runs on; the APIs keep only their encoders (OpenAI SSE
    chunks, Responses and Anthropic events, llama.cpp and Ollama lines). Each output is added to its choice,
    then `render(index, output, choices)` gives what to send for it; an error mid-stream is sent as `error`
    encodes it and ends the stream; otherwise `finish(choices)` closes it."""
    choices = [Choice(i) for i in range(generation.num_choices)]
    try:
        async with aclosing(generation.stream()) as stream:
            async for index, out in stream:
                choices[index].add(out)
                for item in render(index, out, choices):
                    yield item
    except (EmberError, APIError) as err:
        for item in error(from_exception(err)):
            yield item
        return
    for item in finish(choices):
        yield item


async def collect(request: Request, generation: Generation,
                  on_output: Callable[[int, StepOutput], None] | None = None) -> list[Choice]:
    """Run a non-streaming request to the end, aborting it if the client disconnects first."""
    choices = [Choice(i) for i in range(generation.num_choices)]

    async def run() -> list[Choice]:
        async with aclosing(generation.stream()) as stream:
            async for index, out in stream:
                choices[index].add(out)
                if on_output is not None:
                    on_output(index, out)
        return choices

    work = asyncio.create_task(run())
    watcher = asyncio.create_task(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        raise
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if work in done:
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    raise ClientGone()
