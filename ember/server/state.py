"""What the server holds: the model pool (ember.server.pool), its settings, and the generation requests in
flight (for the queue limit and for graceful shutdown)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ember.server.errors import APIError, queue_full
from ember.server.metrics import Metrics
from ember.server.pool import ModelEntry, ModelPool
from ember.server.response_store import ResponseStore

if TYPE_CHECKING:
    from starlette.requests import Request

    from ember.engine.async_engine import AsyncEngine

log = logging.getLogger("ember.server")

__all__ = ["ADMITTED", "LEASES", "LOAD_SECONDS", "ModelEntry", "ModelPool", "ServerState", "Settings"]

LEASES = "ember.leases"  # ASGI scope key: the models a request holds, released when its response has ended
LOAD_SECONDS = "ember.load_seconds"  # ASGI scope key: how long the request waited for its model (Ollama's load_duration)
ADMITTED = "ember.admitted"  # ASGI scope key: the sequences a request was admitted with, given back when it has ended


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 * 2**20
    max_queue: int = 256
    shutdown_grace: float = 5.0
    webui: bool = True  # the browser chat page at / (ember.server.webui)
    runtime_lora: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read server paths)


class ServerState:
    def __init__(self, settings: Settings | None = None, loader: Callable[[], AsyncEngine] | None = None,
                 on_ready: Callable[[], object] | None = None, on_load_error: Callable[[BaseException], object] | None = None,
                 pool: ModelPool | None = None):
        self.settings = settings or Settings()
        # `loader` (tests): builds the default model's engine (blocking), loaded at startup
        self.pool = pool or ModelPool(default_loader=loader, preload=loader is not None)
        self.registry = self.pool  # the loaded models behind get/entry/list
        self.metrics = Metrics(self.pool)
        self.responses = ResponseStore()  # the Responses API's previous_response_id
        self.on_ready = on_ready
        self.on_load_error = on_load_error
        self.load_error: BaseException | None = None
        self.started = time.time()
        self.load_seconds = 0.0
        self.shutting_down = False
        self.inflight: dict[str, AsyncEngine] = {}  # engine request id -> engine, for aborting them
        self.admitted = 0  # sequences admitted whose requests have not ended (what --max-queue bounds)
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._start_task: asyncio.Task | None = None

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}{time.time_ns() % 10**9:09d}"

    # --- admission and tracking of engine requests --------------------------------------------------------
    def admit(self, scope: dict, engine: AsyncEngine, count: int) -> None:
        """Reserve `count` sequences for the request of ASGI `scope`, or refuse them (503) when the engine's
        slots plus the queue are taken. Check and reservation happen with no await between them, so requests
        arriving together cannot all pass the check before any of them counts; GuardMiddleware gives the
        reservation back when the request ends, whichever way (done, error, disconnect, cancellation)."""
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        if LEASES not in scope:
            raise RuntimeError("admit needs the GuardMiddleware (create_app installs it)")
        slots = getattr(getattr(engine, "engine", None), "args", None)
        capacity = (slots.max_num_seqs if slots is not None else 0) + self.settings.max_queue
        if self.admitted + count > capacity:
            raise queue_full()
        self.admitted += count
        scope[ADMITTED] = scope.get(ADMITTED, 0) + count

    def release_admitted(self, scope: dict) -> None:
        self.admitted -= scope.pop(ADMITTED, 0)

    def track(self, request_id: str, engine: AsyncEngine) -> None:
        self.inflight[request_id] = engine

    def untrack(self, request_id: str) -> None:
        self.inflight.pop(request_id, None)

    # --- models ---------------------------------------------------------------------------------------------
    async def use_model(self, request: Request, name: str | None, keep_alive: Any = None,
                        context: int | None = None) -> ModelEntry:
        """Hold model `name` (loading it if needed, with `context` tokens when given) until the request's
        response has ended, streams included: GuardMiddleware releases what is listed under LEASES in the ASGI
        scope. The time spent getting it is kept under LOAD_SECONDS."""
        leases = request.scope.get(LEASES)
        if leases is None:
            raise RuntimeError("use_model needs the GuardMiddleware (create_app installs it)")
        began = time.monotonic()
        adapter = isinstance(name, str) and name in self.pool.lora
        entry = await self.pool.acquire(self.pool.default_name if adapter else name, keep_alive, context)
        request.scope[LOAD_SECONDS] = request.scope.get(LOAD_SECONDS, 0.0) + time.monotonic() - began
        leases.append(entry)
        # A LoRA adapter's name: the base model, seen under the adapter's name (the lease stays the entry's own).
        return dataclasses.replace(entry, name=name, lora=name) if adapter else entry

    async def release_all(self, leases: list[ModelEntry]) -> None:
        while leases:
            await self.pool.release(leases.pop())

    # --- lifecycle ------------------------------------------------------------------------------------------
    async def startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._start_task = self._loop.create_task(self._load())

    async def wait_ready(self) -> None:
        """Until startup (the default model's load, when it is preloaded) has finished; raises its error."""
        if self._start_task is not None:
            await asyncio.shield(self._start_task)
        if self.load_error is not None:
            raise self.load_error

    async def _load(self) -> None:
        began = time.monotonic()
        try:
            await self.pool.start()
        except BaseException as err:  # reported by the CLI as a one-line error
            self.load_error = err
            if self.on_load_error is not None:
                self.on_load_error(err)
            if not isinstance(err, Exception):
                raise
            return
        self.load_seconds = time.monotonic() - began
        if self.on_ready is not None:
            result = self.on_ready()
            if asyncio.iscoroutine(result):
                await result

    def begin_shutdown(self) -> None:
        """From a signal handler: refuse new work now, end what still streams after the grace period."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._begin_shutdown)

    def _begin_shutdown(self) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("shutting down: %d request(s) in flight", len(self.inflight))
        self._abort_timer = asyncio.get_running_loop().call_later(self.settings.shutdown_grace, self.abort_all)

    def abort_all(self) -> None:
        for request_id, engine in list(self.inflight.items()):
            engine.abort(request_id)

    async def shutdown(self) -> None:
        self.shutting_down = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        self.abort_all()
        await self.pool.shutdown()
