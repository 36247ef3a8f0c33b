"""llama.cpp-server-style endpoints: health, tokenize, detokenize, apply-template and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ember.server.errors import bad_request
from ember.server.metrics import CONTENT_TYPE
from ember.server.prompting import plain_messages, render_chat
from ember.server.protocol import ApplyTemplateRequest, DetokenizeRequest, TokenizeRequest
from ember.server.state import ServerState

router = APIRouter()


def get_state(request: Request) -> ServerState:
    return request.app.state.ember


async def _engine(request: Request, body):
    """The engine of the request's "model" (an extension; llama.cpp serves one model), else the default one."""
    model = getattr(body, "model", None)
    entry = await get_state(request).use_model(request, model if isinstance(model, str) else None)
    return entry.engine


@router.get("/health")
async def health(request: Request):
    state = get_state(request)
    if state.pool.ready and not state.shutting_down:
        return {"status": "ok"}
    message = "Shutting down" if state.shutting_down else "Loading model"
    return JSONResponse({"status": "loading" if not state.shutting_down else "shutting_down",
                         "error": {"code": 503, "message": message, "type": "unavailable_error"}},
                        status_code=503, headers={"Retry-After": "1"})


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    tokenizer = (await _engine(request, body)).tokenizer
    ids = tokenizer.encode(body.content, add_special_tokens=body.add_special)
    if body.with_pieces:
        return {"tokens": [{"id": i, "piece": tokenizer.decode([i], skip_special_tokens=False)} for i in ids]}
    return {"tokens": ids}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    engine = await _engine(request, body)
    vocab = engine.tokenizer.vocab_size
    bad = [t for t in body.tokens if t >= vocab]
    if bad:
        raise bad_request(f"tokens: id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
    return {"content": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)}


@router.post("/apply-template")
async def apply_template(body: ApplyTemplateRequest, request: Request):
    engine = await _engine(request, body)
    return {"prompt": render_chat(engine, plain_messages(body.messages), body.tools,
                                  template_kwargs=body.chat_template_kwargs)}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE)
