"""The CPU work a request's own text causes — rendering its chat template, tokenizing, detokenizing — runs in a
worker thread when the body is large, so one multi-megabyte request never stalls the event loop (and with it
every other request and /health). `tokenizers`' batch calls, used for long texts (ember.tokenizer.tokenizer),
release the GIL; template rendering shares it in the interpreter's 5 ms slices. Small bodies run inline: the hop
to a thread and back (~70 µs) costs more than tokenizing a few hundred characters, and up to INLINE_BODY_BYTES the
loop is held for a few milliseconds at most (~0.7 µs a character; benchmarks/offload_threshold.py measures both)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")

BODY_BYTES = "ember.body_bytes"  # ASGI scope key: the request body's size (set by ember.server.app's middleware)
INLINE_BODY_BYTES = 8 * 1024  # a body up to this size is tokenized inline (its text has at most as many chars)


async def off_loop(request: Request, work: Callable[[], T]) -> T:
    """`work()` inline for a small body, else in a worker thread (its exceptions propagate either way)."""
    if request.scope.get(BODY_BYTES, 0) <= INLINE_BODY_BYTES:
        return work()
    return await asyncio.to_thread(work)
