"""Reranking with a cross-encoder: `/v1/rerank` (Jina/Cohere shape, as llama.cpp and vLLM serve it, also at
`/rerank` and `/v2/rerank`) and vLLM's `/v1/score`. Scores are sigmoid(logit) of the model's one label."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from ember.server.errors import APIError, bad_request
from ember.server.openai_api import get_state
from ember.server.protocol import RerankRequest, ScoreRequest
from ember.server.state import ModelEntry, ServerState

router = APIRouter()


async def _score(state: ServerState, entry: ModelEntry, pairs: list[tuple[str, str]]):
    if state.shutting_down:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    if not entry.engine.is_encoder:
        raise bad_request(f"model: {entry.name} is a chat model; scoring needs a reranking (cross-encoder) model",
                          param="model")
    return await entry.engine.encode(lambda engine: engine.score_pairs(pairs))


@router.post("/v1/rerank")
@router.post("/v2/rerank")
@router.post("/rerank")
async def rerank(body: RerankRequest, request: Request):
    state = get_state(request)
    entry = await state.use_model(request, body.model)
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    result = await _score(state, entry, [(body.query, text) for text in texts])
    ranked = sorted(range(len(texts)), key=lambda i: result.values[i], reverse=True)[: body.top_n]
    results = []
    for index in ranked:
        item = {"index": index, "relevance_score": result.values[index]}
        if body.return_documents:
            item["document"] = {"text": texts[index]}
        results.append(item)
    return {"id": state.new_id("rerank"), "model": entry.name, "results": results,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}


@router.post("/v1/score")
@router.post("/score")
async def score(body: ScoreRequest, request: Request):
    state = get_state(request)
    entry = await state.use_model(request, body.model)
    first = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    second = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise bad_request(f"text_1 has {len(first)} texts and text_2 {len(second)}: give one text_1, or lists of "
                          "the same length", param="text_2")
    result = await _score(state, entry, list(zip(first, second, strict=True)))
    return {"id": state.new_id("score"), "object": "list", "created": int(time.time()), "model": entry.name,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(result.values)],
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}
