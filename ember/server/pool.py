"""The server's models: any resolvable model, loaded on first use, kept for a while, unloaded when idle.

- A request names a model (resolved with ``allow_paths=False``; the model given to ``ember serve`` may be a path
  and is registered under its name). ``async with pool.use(name, keep_alive) as entry`` holds it (a reference
  count) for the request's lifetime; concurrent first requests for one model await ONE load.
- ``keep_alive`` (Ollama's, parsed by ember.server.keep_alive): seconds or a duration ("5m", "1h30m", "30s"); 0
  unloads as soon as the model is idle, negative keeps it forever. The last request's value wins.
- Memory (ember.server.memory_budget): before loading, the model's weights + KV cache at the wanted context +
  runtime overhead are estimated (ember.store.memory). Idle models are evicted least recently used first to make
  room; a model with requests running is never evicted. The model given to ``ember serve`` is pinned: requests'
  keep_alive does not unload it (an explicit unload, ``ember stop``, does; it may still be evicted while idle).
  If the model still does not fit, its context is lowered to the largest that fits (logged, and reported in
  /api/ps); if not even that fits, 503 (with Retry-After while other models are busy).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ember.engine.lora_spec import LoraSpec, lora_specs
from ember.errors import EmberError, ModelLoadError
from ember.server.errors import APIError, bad_request, model_not_found
from ember.server.keep_alive import DEFAULT_KEEP_ALIVE, parse_keep_alive
from ember.server.memory_budget import context_limit, default_max_memory, gib, measured_size, no_room

if TYPE_CHECKING:
    from ember.engine.async_engine import AsyncEngine
    from ember.store.model_info import ModelInfo
    from ember.store.resolve import ResolvedModel

log = logging.getLogger("ember.server")

REAP_INTERVAL = 1.0
RELOAD_WAIT = 30.0  # seconds a request for another num_ctx waits for a busy model before 503



@dataclass(eq=False)
class ModelEntry:
    """A loaded model."""
    name: str
    engine: AsyncEngine
    created: int  # unix seconds, when it was loaded
    size: int = 0  # bytes it is counted for against max_memory
    context_length: int = 0
    resolved: ResolvedModel | None = None
    context_fitted: bool = False  # the context was lowered to fit the memory budget
    refs: int = 0  # requests using it now
    keep_alive: float | None = DEFAULT_KEEP_ALIVE  # seconds after the last request; None: forever
    expires: float | None = None  # unix seconds when it unloads (idle only); None: not scheduled
    last_used: float = field(default_factory=time.monotonic)
    device: str = "cpu"
    info: ModelInfo | None = None  # what the model is (ember.store.model_info), with its measured load time
    requested_context: int | None = None  # the context a request asked for (Ollama's num_ctx); None: the default
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while no request holds it
    # Set on a request's view of the base model's entry when the request names one of its LoRA adapters.
    lora: str | None = None

    @property
    def busy(self) -> bool:
        return self.refs > 0

    @property
    def expires_at(self) -> float | None:
        """Unix seconds when it will unload; None: never. A busy model counts from now."""
        if self.keep_alive is None:
            return None
        if self.refs == 0 and self.expires is not None:
            return self.expires
        return time.time() + self.keep_alive


class ModelPool:
    def __init__(self, engine_args: dict | None = None, max_memory: int | None = None,
                 default_model: str | None = None, allow_paths_for_default: bool = True, *,
                 keep_alive: float | None = DEFAULT_KEEP_ALIVE, preload: bool | None = None,
                 default_loader: Callable[[], AsyncEngine] | None = None,
                 loader: Callable[[ResolvedModel, dict], AsyncEngine] | None = None, lora: list | None = None):
        self.engine_args = {k: v for k, v in (engine_args or {}).items() if v is not None}
        self.max_memory = max_memory if max_memory is not None else default_max_memory(
            self.engine_args.get("device", "auto"))
        self.default_model = default_model
        self.allow_paths_for_default = allow_paths_for_default
        self.keep_alive = keep_alive
        self.preload = preload if preload is not None else (default_model is not None or default_loader is not None)
        self._default_loader = default_loader  # builds the default model when it has no ResolvedModel
        self.loader = loader or load_engine  # (resolved, engine args) -> engine, blocking; tests replace it
        self.load_count = 0
        self.default_name: str | None = None
        self.started = False  # ready: the default model (when preloaded) is loaded
        self._open = False  # requests may load models
        self.closing = False
        self._models: dict[str, ModelEntry] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._waiting: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._registered: dict[str, ResolvedModel | None] = {}  # names the resolver does not know (CLI paths)
        self.pinned: set[str] = set()  # the `ember serve` model: stays loaded until `ember stop` or evicted idle
        # The default model's LoRA adapters by name (--lora, and those loaded at run time): requests name them as
        # models; a reload of the default model loads them again.
        self.lora: dict[str, LoraSpec] = {spec.name: spec for spec in lora_specs(lora)}
        self._plan_lock: asyncio.Lock | None = None
        self._reaper: asyncio.Task | None = None

    # --- lifecycle --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the reaper; register (and, when `preload`, load) the default model."""
        self._plan_lock = asyncio.Lock()
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        if self._default_loader is not None and self.preload:
            began = time.monotonic()
            engine = await asyncio.to_thread(self._default_loader)
            await engine.start()
            seconds = time.monotonic() - began
            self.load_count += 1
            self.default_name = engine.model_name
            self._registered[engine.model_name] = None
            self.pinned.add(engine.model_name)
            entry = ModelEntry(engine.model_name, engine, int(time.time()), measured_size(engine),
                               engine.max_model_len, device=_device(engine), keep_alive=self.keep_alive,
                               info=await asyncio.to_thread(_describe_engine, engine.model_name, engine, seconds))
            self._schedule_expiry(entry)
            self._models[entry.name] = entry
        elif self.default_model is not None or self.preload:
            from ember.store.resolve import resolve

            resolved = await asyncio.to_thread(resolve, self.default_model, allow_paths=self.allow_paths_for_default)
            self.default_name = resolved.name
            self._registered[resolved.name] = resolved
            if self.preload:
                self.pinned.add(resolved.name)
            self._open = True
            if self.preload:
                async with self.use(resolved.name):
                    pass
        self._open = True
        self.started = True

    async def shutdown(self) -> None:
        self.closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        for task in list(self._loading.values()):
            await asyncio.gather(task, return_exceptions=True)
        for entry in list(self._models.values()):
            await self._unload(entry)

    @property
    def ready(self) -> bool:
        return self.started

    # --- lookups ----------------------------------------------------------------------------------------------
    def list(self) -> list[ModelEntry]:
        """The loaded models."""
        return list(self._models.values())

    def loaded(self, name: str | None) -> ModelEntry | None:
        if not name:
            return self._models.get(self.default_name) if self.default_name else None
        return self._models.get(name) or (self._models.get(name.removesuffix(":latest"))
                                          if name.endswith(":latest") else None)

    def serves(self, name: str) -> bool:
        """Whether `name` is the model `ember serve` was started with (the default of requests naming none)."""
        served = set(self._registered) | self.pinned | ({self.default_name} if self.default_name else set())
        return bool({name, name.removesuffix(":latest")} & served)

    def registered(self) -> list[ResolvedModel]:
        """Models known by name without the resolver (the `ember serve` model) that are not loaded now."""
        return [r for n, r in self._registered.items() if r is not None and n not in self._models]

    def entry(self, name: str | None) -> ModelEntry:
        """A loaded model (no loading); 404 when it is not loaded."""
        found = self.loaded(name)
        if found is None:
            if not self.started:
                raise _loading()
            raise model_not_found(name or "")
        return found

    def get(self, name: str | None) -> AsyncEngine:
        return self.entry(name).engine

    async def lookup(self, name: str | None) -> tuple[str, ResolvedModel | None]:
        """(the model's pool name, where its files are) for a name from a request; 400 for a malformed name,
        404 for an unknown one. Never takes a path from a request."""
        from ember.store.names import parse_ref
        from ember.store.resolve import resolve

        if not name:
            if self.default_name is None:
                resolved = await asyncio.to_thread(resolve, None, allow_paths=False)
                self.default_name = resolved.name
                self._registered.setdefault(resolved.name, resolved)
            return self.default_name, self._registered.get(self.default_name)
        candidates = [name, name.removesuffix(":latest")] if name.endswith(":latest") else [name]
        for candidate in candidates:
            if candidate in self._models or candidate in self._registered or candidate in self._loading:
                entry = self._models.get(candidate)
                return candidate, self._registered.get(candidate) or (entry.resolved if entry else None)
        if not isinstance(name, str):
            raise bad_request("model: expected a string", param="model")
        try:
            parse_ref(name, allow_paths=False)
        except ModelLoadError as err:
            raise APIError(400, str(err), param="model", code="invalid_model") from None
        for candidate in candidates:
            try:
                resolved = await asyncio.to_thread(resolve, candidate, allow_paths=False)
            except ModelLoadError:
                continue
            return resolved.name, resolved
        raise model_not_found(name)

    # --- use ------------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def use(self, name: str | None, keep_alive: Any = None) -> AsyncIterator[ModelEntry]:
        """Hold a model (loading it first if needed) for the block; `entry.engine` is its engine."""
        entry = await self.acquire(name, keep_alive)
        try:
            yield entry
        finally:
            await self.release(entry)

    async def acquire(self, name: str | None, keep_alive: Any = None, context: int | None = None) -> ModelEntry:
        """Hold a model; `context` (Ollama's num_ctx): the context it must be loaded with; an idle model loaded
        with another one is reloaded, as Ollama does, once the requests using it are done."""
        if self.closing:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        if not self._open:
            raise _loading()
        seconds = parse_keep_alive(keep_alive, self.keep_alive)
        key, resolved = await self.lookup(name)
        while True:
            entry = self._models.get(key)
            if entry is not None and context is not None and context not in (entry.context_length,
                                                                                entry.requested_context):
                await self._reload_for(entry, context)
                continue
            if entry is not None:
                entry.refs += 1
                entry.idle.clear()
                entry.keep_alive = None if key in self.pinned else seconds
                entry.expires = None
                entry.last_used = time.monotonic()
                return entry
            task = self._loading.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._load(key, resolved, context))
                self._loading[key] = task
                task.add_done_callback(self._loaded)
            self._waiting[key] = self._waiting.get(key, 0) + 1
            try:
                await asyncio.shield(task)
            finally:
                self._waiting[key] -= 1
                if not self._waiting[key]:
                    del self._waiting[key]

    def _loaded(self, task: asyncio.Task) -> None:
        for key, pending in list(self._loading.items()):
            if pending is task:
                del self._loading[key]
        if not task.cancelled():
            task.exception()  # retrieved here: the waiters (if any are left) get it from the task

    async def release(self, entry: ModelEntry) -> None:
        entry.refs -= 1
        entry.last_used = time.monotonic()
        if entry.refs > 0:
            return
        entry.idle.set()
        if entry.keep_alive is not None and entry.keep_alive <= 0:
            await asyncio.shield(self._shutdown_engine(entry.name, self._forget(entry)))
        else:
            self._schedule_expiry(entry)

    async def stop(self, name: str | None) -> str:
        """Unload a model now if it is idle, else as soon as its requests finish (Ollama's keep_alive 0)."""
        entry = self.loaded(name)
        if entry is not None:
            self.pinned.discard(entry.name)
        else:
            key, _ = await self.lookup(name)  # 400/404 for bad names
            self.pinned.discard(key)
            task = self._loading.get(key)
            if task is None:
                return key
            await asyncio.gather(task, return_exceptions=True)
            entry = self._models.get(key)
            if entry is None:
                return key
        entry.keep_alive = 0.0
        if not entry.busy:
            await self._unload(entry)
        return entry.name

    def _schedule_expiry(self, entry: ModelEntry) -> None:
        entry.expires = None if entry.keep_alive is None else time.time() + entry.keep_alive

    # --- loading ----------------------------------------------------------------------------------------------
    def used_bytes(self) -> int:
        return sum(e.size for e in self._models.values()) + sum(self._reserved.values())

    async def _reload_for(self, entry: ModelEntry, context: int) -> None:
        if entry.resolved is None:
            raise bad_request(f"num_ctx: {entry.name} was built in-process and cannot be reloaded with another "
                              f"context (it has {entry.context_length})", param="num_ctx")
        if entry.busy:
            # As Ollama does, the request waits for the requests using the model to finish, then reloads it
            # (the caller looks again: another request may have reloaded it meanwhile).
            try:
                await asyncio.wait_for(entry.idle.wait(), RELOAD_WAIT)
            except asyncio.TimeoutError:
                raise APIError(503, f"{entry.name} is in use with a context of {entry.context_length} tokens; it "
                                    f"is reloaded with num_ctx {context} once idle", code="server_busy",
                               headers={"Retry-After": "1"}) from None
            return
        log.info("reloading %s with a context of %d tokens (num_ctx)", entry.name, context)
        await self._unload(entry)

    async def _load(self, key: str, resolved: ResolvedModel | None, context: int | None = None) -> ModelEntry:
        began = time.monotonic()
        args = dict(self.engine_args)
        if context is not None:
            args["max_model_len"] = context
        if key == self.default_name and self.lora:
            args["lora"] = list(self.lora.values())
        if resolved is None:  # the default model built by a callable: no estimate up front
            engine = await asyncio.to_thread(self._default_loader)
            size, fitted = None, False
        else:
            size, fitted = await self._plan(key, resolved, args)
            try:
                engine = await asyncio.to_thread(self.loader, resolved, args)
            finally:
                self._reserved.pop(key, None)
        try:
            await engine.start()
        except BaseException:
            await engine.shutdown()
            raise
        seconds = time.monotonic() - began
        self.load_count += 1
        entry = ModelEntry(key, engine, int(time.time()), size if size is not None else measured_size(engine),
                           engine.max_model_len, resolved, fitted, keep_alive=self.keep_alive, device=_device(engine),
                           info=await asyncio.to_thread(_describe_engine, key, engine, seconds, resolved),
                           requested_context=context)
        self._schedule_expiry(entry)
        self._models[key] = entry
        log.info("loaded %s in %.1f s (%s, context %d)", key, time.monotonic() - began, gib(entry.size),
                 entry.context_length)
        return entry

    async def _plan(self, key: str, resolved: ResolvedModel, args: dict) -> tuple[int | None, bool]:
        """Make room and pick the context; sets args' max_model_len/kv_memory; reserves the bytes."""
        from ember.engine.engine import DEFAULT_MAX_MODEL_LEN
        from ember.loader.device import resolve_device
        from ember.store.memory import estimate_memory, fit_context

        dtype = str(args.get("dtype", "auto"))
        kv_cache_dtype = str(args.get("kv_cache_dtype", "auto"))
        try:
            # What the engine will hold depends on where it runs (native CPU kernels keep the file's blocks,
            # GPUs repack) and "auto" dtype on it (float32 on CPU): estimate for the device it will load on.
            device = resolve_device(args.get("device", "auto")).type
            limit = await asyncio.to_thread(context_limit, resolved.path)
            wanted = args.get("max_model_len") or min(limit or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
            if limit:
                wanted = min(wanted, limit)
            adapters = [spec.path for spec in args.get("lora", ())]
            lora_dtype = str(args.get("lora_dtype", "auto"))
            full = await asyncio.to_thread(estimate_memory, resolved.path, int(wanted), dtype, device, kv_cache_dtype,
                                           adapters, lora_dtype)
        except (EmberError, OSError, ValueError, KeyError) as err:
            log.warning("cannot estimate the memory %s needs (%s); loading it without a budget check", key, err)
            return None, False
        user_kv = args.get("kv_memory")
        fixed = full.weights_bytes + full.overhead_bytes
        need = fixed + (user_kv if user_kv is not None else full.kv_bytes)
        assert self._plan_lock is not None
        async with self._plan_lock:
            free = self.max_memory - self.used_bytes()
            idle = sorted((e for e in self._models.values() if not e.busy and not self._waiting.get(e.name)),
                          key=lambda e: e.last_used)
            victims = []
            while need > free and idle:
                victim = idle.pop(0)
                victims.append(victim)
                free += victim.size
            context, fitted = int(wanted), False
            if need > free:
                busy = [e for e in self._models.values() if e not in victims] + [k for k in self._reserved]
                if user_kv is None:
                    try:
                        context = await asyncio.to_thread(fit_context, resolved.path, free, int(wanted), dtype,
                                                            device, kv_cache_dtype, adapters, lora_dtype)
                        fitted = True
                    except EmberError as err:
                        raise no_room(key, need, busy, err, self.max_memory) from None
                else:
                    raise no_room(key, need, busy, None, self.max_memory)
            for victim in victims:
                log.info("unloading %s (idle) to make room for %s", victim.name, key)
                await self._unload(victim)
            kv = user_kv if user_kv is not None else full.kv_bytes // full.context * context
            if user_kv is None and not fitted:
                # Beyond one full context, room for every sequence slot to hold a 2K-token conversation,
                # as far as the budget allows: a cache of one context would make concurrent requests
                # preempt each other long before the slots are used.
                roomy = full.kv_bytes // full.context * int(args.get("max_num_seqs") or 32) * 2048
                kv = max(kv, min(roomy, free - fixed))
            size = fixed + kv
            if fitted:
                log.warning("%s: %d tokens of context need %s but %s of --max-memory is left; context lowered "
                            "to %d tokens", key, wanted, gib(need), gib(free), context)
            args["max_model_len"] = context
            args["kv_memory"] = kv
            self._reserved[key] = size
        return size, fitted

    def _forget(self, entry: ModelEntry):
        """Take a model out of the pool at once (no await: nothing can pick it up after this); its engine."""
        if self._models.get(entry.name) is entry:
            del self._models[entry.name]
        engine, entry.engine = entry.engine, None  # drop the reference before collecting
        return engine

    async def _unload(self, entry: ModelEntry) -> None:
        await self._shutdown_engine(entry.name, self._forget(entry))

    async def _shutdown_engine(self, name: str, engine) -> None:
        if engine is None:
            return
        await engine.shutdown()
        device = _device(engine)
        del engine
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        log.info("unloaded %s", name)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            now = time.time()
            for entry in list(self._models.values()):
                if not entry.busy and entry.expires is not None and entry.expires <= now \
                        and not self._waiting.get(entry.name):
                    try:
                        await self._unload(entry)
                    except Exception:
                        log.exception("unloading %s failed", entry.name)


def _loading() -> APIError:
    return APIError(503, "the model is still loading", code="loading", headers={"Retry-After": "1"})


def _device(engine) -> str:
    return str(getattr(getattr(engine, "engine", None), "device", "cpu"))


def _describe_engine(name: str, engine, seconds: float, resolved: ResolvedModel | None = None) -> ModelInfo | None:
    """The ModelInfo of a loaded model, with its load time; None for an engine without files (test fakes)."""
    from ember.store.model_info import describe_model

    loaded = getattr(getattr(engine, "engine", None), "loaded", None)
    path, fmt = (resolved.path, resolved.format) if resolved is not None else (
        getattr(loaded, "path", None), getattr(loaded, "format", None))
    if path is None or fmt is None:
        return None
    try:
        return describe_model(name, path, fmt).loaded(seconds)
    except (EmberError, OSError) as err:
        log.warning("cannot describe %s: %s", name, err)
        return None


def load_engine(resolved: ResolvedModel, args: dict) -> AsyncEngine:
    """Load a resolved model into an engine (blocking: run it in a worker thread)."""
    from ember.engine.async_engine import AsyncEngine
    from ember.engine.engine import EngineArgs
    from ember.engine.factory import create_engine
    from ember.loader.model import load_model

    loaded = load_model(resolved.path, dtype=args.get("dtype", "auto"), device=args.get("device", "auto"),
                        name=resolved.name)
    return AsyncEngine(create_engine(resolved.name, EngineArgs(**args), loaded=loaded))
