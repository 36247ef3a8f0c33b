"""AsyncEngine: the asyncio face of LLMEngine for the server.

The engine's steps run on one dedicated thread (PyTorch releases the GIL inside kernels, so the event
loop stays responsive). The event loop only hands over requests and aborts through a locked inbox and
receives outputs through per-request asyncio queues, so no engine state is touched from two threads.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from ember.engine.engine import EngineArgs, LLMEngine
from ember.engine.factory import create_engine
from ember.engine.lora_spec import LoraSpec
from ember.engine.outputs import StepOutput
from ember.errors import EmberError
from ember.sampling_params import SamplingParams, StructuredOutput

log = logging.getLogger("ember.engine")


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.model_name = engine.model_name
        self.tokenizer = engine.tokenizer
        self.chat_template = engine.loaded.chat_template
        self.max_model_len = engine.max_model_len
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._new: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: set[str] = set()
        self._jobs: list[tuple[Callable[[], Any], Future]] = []
        self._embeds: list[tuple[Callable[[Any], Any], int | None, Future]] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def from_model(cls, model: str | None, **engine_args) -> AsyncEngine:
        return cls(create_engine(model, EngineArgs(**engine_args)))

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ember-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    def stats(self) -> dict:
        with self._lock:
            queued = len(self._new)
        stats = self.engine.stats()
        stats["waiting"] += queued
        return stats

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[StepOutput]:
        """Stream a request's outputs; leaving the iterator early (client gone) aborts the request."""
        self.engine.validate(prompt_token_ids, params)
        queue: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise EmberError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (asyncio.get_running_loop(), queue)
            self._new.append((request_id, list(prompt_token_ids), params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)
        self._wake.set()

    def compile_grammar(self, structured: StructuredOutput, field: str = "structured") -> None:
        """Compile a constraint into the engine's grammar cache (any thread; the server uses a worker thread)."""
        self.engine.grammars.compile(structured, field)

    async def embed(self, prompt_token_ids: list[int]) -> list[float]:
        return await self._run_on_engine(lambda: self.engine.embed(prompt_token_ids))

    @property
    def is_encoder(self) -> bool:
        """An embedding model or cross-encoder (an EmbeddingEngine): no generation."""
        return getattr(self.engine, "is_encoder", False)

    async def encode(self, job: Callable[[Any], Any]) -> Any:
        """Run job(embedding_engine) on the engine thread: an encoder's embed_* or score_pairs call."""
        return await self._run_on_engine(lambda: job(self.engine))

    async def embed_batched(self, prepare: Callable[[Any], Any], dimensions: int | None = None) -> Any:
        """An embedding request whose inputs (`prepare(engine)`, run on the engine thread) go through the encoder
        together with every other one waiting at the same time (EmbeddingEngine.embed_many)."""
        future: Future = Future()
        with self._lock:
            self._embeds.append((prepare, dimensions, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    async def load_lora(self, spec: LoraSpec) -> None:
        """Read an adapter's files in a worker thread, then register it on the engine thread between steps."""
        weights = await asyncio.to_thread(self.engine.lora.read, spec)
        await self._run_on_engine(lambda: self.engine.add_lora(weights))

    async def unload_lora(self, name: str) -> None:
        await self._run_on_engine(lambda: self.engine.unload_lora(name))

    async def running_sequences(self) -> list[dict]:
        return await self._run_on_engine(self.engine.running_sequences)

    async def _run_on_engine(self, job: Callable[[], Any]) -> Any:
        future: Future = Future()
        with self._lock:
            self._jobs.append((job, future))
        self._wake.set()
        return await asyncio.wrap_future(future)

    def _deliver(self, output: StepOutput | BaseException, request_id: str) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, output)

    def _drain_inbox(self) -> None:
        with self._lock:
            new, self._new = self._new, []
            aborts, self._aborts = self._aborts, set()
            jobs, self._jobs = self._jobs, []
            embeds, self._embeds = self._embeds, []
        for request_id, prompt, params in new:
            if request_id in aborts:
                continue
            try:
                self.engine.add_request(request_id, prompt, params)
            except Exception as err:  # reported to the waiting client, never kills the loop
                self._deliver(err, request_id)
        for request_id in aborts:
            output = self.engine.abort(request_id)
            if output is not None:
                self._deliver(output, request_id)
        for job, future in jobs:
            try:
                future.set_result(job())
            except Exception as err:
                future.set_exception(err)
        if embeds:
            self._embed_together(embeds)

    def _embed_together(self, embeds: list[tuple[Callable[[Any], Any], int | None, Future]]) -> None:
        """One encoder pass for every waiting embedding request; a request's own bad input fails it alone."""
        ready = []
        for prepare, dimensions, future in embeds:
            try:
                self.engine.check_dimensions(dimensions)
                ready.append((prepare(self.engine), dimensions, future))
            except Exception as err:
                future.set_exception(err)
        if not ready:
            return
        try:
            results = self.engine.embed_many([(inputs, dimensions) for inputs, dimensions, _ in ready])
        except Exception as err:
            for *_, future in ready:
                future.set_exception(err)
            return
        for (*_, future), result in zip(ready, results, strict=True):
            future.set_result(result)

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()  # before draining, so a request arriving after the drain wakes the wait
            self._drain_inbox()
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:
                log.exception("engine step failed; failing its requests")
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    self._deliver(EmberError(f"internal engine error: {err}"), request_id)
                continue
            for output in outputs:
                self._deliver(output, output.request_id)
        for request_id in list(self.engine.requests):
            output = self.engine.abort(request_id)
            if output is not None:
                self._deliver(output, request_id)
