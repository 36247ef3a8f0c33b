"""LoRA adapters of the served model (docs/lora.md): listed as models, loaded and unloaded at run time with
vLLM's endpoints. Adapters belong to the `ember serve` model (the pool's default model)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from ember.engine.lora_spec import LoraSpec, check_name
from ember.errors import LoraNotFound
from ember.server.errors import APIError, bad_request
from ember.server.protocol import LoadLoraRequest, UnloadLoraRequest
from ember.server.state import ServerState

router = APIRouter()


def get_state(request: Request) -> ServerState:
    return request.app.state.ember


def lora_cards(state: ServerState) -> list[dict]:
    """/v1/models entries of the adapters, as vLLM lists them (parent: the base model, root: the adapter's path)."""
    pool = state.pool
    base = pool.loaded(pool.default_name)
    created = base.created if base is not None else int(state.started)
    return [{"id": name, "object": "model", "created": created, "owned_by": "ember", "parent": pool.default_name,
             "root": spec.path, "meta": {"lora": True, "scale": spec.scale, "loaded": base is not None}}
            for name, spec in pool.lora.items()]


def _check_allowed(state: ServerState) -> None:
    if not state.settings.runtime_lora:
        raise APIError(403, "loading LoRA adapters at run time is off: start the server with --runtime-lora",
                       code="runtime_lora_disabled")


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraRequest, request: Request):
    state = get_state(request)
    _check_allowed(state)
    name = check_name(body.lora_name)
    pool = state.pool
    if name in pool.lora:
        raise bad_request(f"lora_name: an adapter named {name!r} is already loaded", param="lora_name")
    if name == pool.default_name or pool.loaded(name) is not None:
        raise bad_request(f"lora_name: {name!r} is a model's name", param="lora_name")
    entry = await state.use_model(request, None)  # the served model, loaded again if it was unloaded
    if entry.engine.is_encoder:
        raise bad_request(f"{entry.name} is an embedding model: LoRA adapters apply to generation models",
                          param="lora_name")
    spec = LoraSpec(name, body.lora_path, body.scale)
    await entry.engine.load_lora(spec)  # 400 (LoraError) for bad paths, formats, shapes or target modules
    pool.lora[name] = spec
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request):
    state = get_state(request)
    _check_allowed(state)
    name, pool = body.lora_name, state.pool
    if name not in pool.lora:
        raise LoraNotFound(f"no LoRA adapter named {name!r} is loaded")
    entry = pool.loaded(pool.default_name)
    if entry is not None:
        # 409 (LoraInUse) while requests use it: unloading never changes a running request's model.
        await entry.engine.unload_lora(name)
    del pool.lora[name]
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
