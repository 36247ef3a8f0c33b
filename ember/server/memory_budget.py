"""The memory budget of the model pool: how much it may hold, what a loaded engine holds, and the answer when a
model does not fit. The estimates themselves are ember.store.memory's (shared with `ember recommend`)."""

from __future__ import annotations

import logging

from ember.server.errors import APIError

log = logging.getLogger("ember.server")


def default_max_memory(device: str = "auto") -> int:
    """75% of the available RAM on CPU, 90% of the free memory of the GPU."""
    try:
        from ember.loader.device import resolve_device

        target = resolve_device(device)
        if target.type == "cuda":
            import torch

            free, _ = torch.cuda.mem_get_info(target)
            return int(free * 0.9)
    except Exception as err:  # no usable device info: fall back to RAM
        log.debug("no device memory info (%s); using RAM", err)
    import psutil

    return int(psutil.virtual_memory().available * 0.75)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def context_limit(path) -> int | None:
    from ember.store.info import describe_path

    value = describe_path(path).get("context_length")
    return int(value) if value else None


def measured_size(engine) -> int:
    """Weights (parameters and buffers: quantized weights are buffers) + KV cache of a loaded engine, in bytes."""
    inner = getattr(engine, "engine", None)
    model = getattr(getattr(inner, "loaded", None), "model", None)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) \
        if model is not None else 0
    kv = getattr(getattr(inner, "args", None), "kv_memory", None) or 0
    return weights + kv


def no_room(key: str, need: int, busy: list, err: Exception | None, max_memory: int) -> APIError:
    """Why a model cannot be loaded now: 503, busy (try later) or short of memory for good."""
    if busy:
        return APIError(503, f"server busy: {len(busy)} model{'s' if len(busy) != 1 else ''} in use; not enough "
                             f"memory to load {key} (needs {gib(need)}, --max-memory {gib(max_memory)})",
                        code="server_busy", headers={"Retry-After": "5"})
    detail = str(err) if err is not None else f"needs {gib(need)}"
    return APIError(503, f"cannot load {key}: {detail}; --max-memory is {gib(max_memory)}",
                    code="insufficient_memory")
