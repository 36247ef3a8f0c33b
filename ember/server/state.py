"""What the server holds: the models (behind one lookup, so a multi-model pool can replace it), its settings,
and the generation requests in flight (for the queue limit and for graceful shutdown)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ember.server.errors import APIError, model_not_found, queue_full
from ember.server.metrics import Metrics

if TYPE_CHECKING:
    from ember.engine.async_engine import AsyncEngine

log = logging.getLogger("ember.server")


@dataclass
class ModelEntry:
    name: str
    engine: AsyncEngine
    created: int  # unix seconds, when it was loaded


class ModelRegistry:
    """Model name -> engine. One model for now; `get(None)` or `get("")` is the default model."""

    def __init__(self) -> None:
        self._models: dict[str, ModelEntry] = {}
        self._default: str | None = None

    def add(self, engine: AsyncEngine, name: str | None = None) -> ModelEntry:
        entry = ModelEntry(name or engine.model_name, engine, int(time.time()))
        self._models[entry.name] = entry
        if self._default is None:
            self._default = entry.name
        return entry

    def entry(self, name: str | None) -> ModelEntry:
        if not name:
            if self._default is None:
                raise APIError(503, "the model is still loading", code="loading", headers={"Retry-After": "1"})
            return self._models[self._default]
        found = self._models.get(name)
        if found is None and name.endswith(":latest"):  # Ollama clients tag every model name
            found = self._models.get(name.removesuffix(":latest"))
        if found is None:
            raise model_not_found(name)
        return found

    def get(self, name: str | None) -> AsyncEngine:
        return self.entry(name).engine

    def list(self) -> list[ModelEntry]:
        return list(self._models.values())

    @property
    def ready(self) -> bool:
        return bool(self._models)


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 * 2**20
    max_queue: int = 256
    shutdown_grace: float = 5.0


class ServerState:
    def __init__(self, settings: Settings | None = None, loader: Callable[[], AsyncEngine] | None = None,
                 on_ready: Callable[[], object] | None = None, on_load_error: Callable[[BaseException], object] | None = None):
        self.settings = settings or Settings()
        self.registry = ModelRegistry()
        self.metrics = Metrics(self.registry)
        self.loader = loader  # builds the engine (blocking); None when engines are added before serving
        self.on_ready = on_ready
        self.on_load_error = on_load_error
        self.load_error: BaseException | None = None
        self.started = time.time()
        self.load_seconds = 0.0
        self.shutting_down = False
        self.inflight: dict[str, AsyncEngine] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}{time.time_ns() % 10**9:09d}"

    # --- admission and tracking of engine requests --------------------------------------------------------
    def admit(self, engine: AsyncEngine, count: int) -> None:
        """Refuse `count` more sequences when the engine's slots plus the queue are taken."""
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        slots = getattr(getattr(engine, "engine", None), "args", None)
        capacity = (slots.max_num_seqs if slots is not None else 0) + self.settings.max_queue
        if len(self.inflight) + count > capacity:
            raise queue_full()

    def track(self, request_id: str, engine: AsyncEngine) -> None:
        self.inflight[request_id] = engine

    def untrack(self, request_id: str) -> None:
        self.inflight.pop(request_id, None)

    # --- lifecycle ------------------------------------------------------------------------------------------
    async def startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.loader is not None and not self.registry.ready:
            asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        began = time.monotonic()
        try:
            engine = await asyncio.to_thread(self.loader)
            await engine.start()
        except BaseException as err:  # reported by the CLI as a one-line error
            self.load_error = err
            if self.on_load_error is not None:
                self.on_load_error(err)
            if not isinstance(err, Exception):
                raise
            return
        self.load_seconds = time.monotonic() - began
        self.registry.add(engine)
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
        for entry in self.registry.list():
            await entry.engine.shutdown()
