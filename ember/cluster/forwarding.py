"""An HTTP request carried from the ingress to a replica, and its replay into the replica's ASGI app.

The ingress reads the request (it needs the body to route it), sends it to a replica as a `ForwardedRequest`, and
the replica runs it through ember's own app (`ember.server.app.create_app`): every API, the guard middleware and
the error handlers work as they do in a single-process server. The answer comes back as a stream: first a
`ResponseStart`, then the body in chunks as the app sends them, so a streamed answer stays streamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

# A chunk waits for the ones queued behind it only while they are already there: chunks are joined to save
# per-message overhead, never delayed for it.
_MAX_JOINED_BYTES = 1 << 16
_APP_EXIT_GRACE_S = 5.0  # after the client left, for the app to abort its engine requests and return


@dataclass
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    prefix: tuple[int, ...] = ()  # routing key: chained hashes of the prompt's leading text (ember.cluster.prefix)

    def scope(self) -> dict:
        return {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
            "query_string": self.query_string, "root_path": "", "headers": list(self.headers),
            "client": self.client, "server": None,
        }


@dataclass
class ResponseStart:
    status: int
    headers: list[tuple[bytes, bytes]]
    replica: str = ""
    elapsed: float = 0.0  # seconds the replica took from receiving the request to starting its response

    def header(self, name: bytes) -> str:
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return ""


async def replay(app, request: ForwardedRequest, replica: str = "") -> AsyncIterator[ResponseStart | bytes]:
    """Run `request` through the ASGI `app`: a ResponseStart, then body chunks. When the consumer stops early
    (its client left, or the ingress cancelled), the app sees `http.disconnect` and aborts its work."""
    began = time.perf_counter()
    messages: asyncio.Queue[dict | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if gone.is_set():
            raise OSError("the client has gone")
        messages.put_nowait(message)

    task = asyncio.create_task(app(request.scope(), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while True:
            message = await messages.get()
            if message is None:
                task.result()  # the app's own error, if it ended without answering
                return
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], [(k, v) for k, v in message.get("headers", [])], replica,
                                    time.perf_counter() - began)
                continue
            if message["type"] != "http.response.body":
                continue
            chunk, more = message.get("body", b""), message.get("more_body", False)
            while more and not messages.empty() and len(chunk) < _MAX_JOINED_BYTES:
                following = messages.get_nowait()
                if following is None:
                    messages.put_nowait(None)
                    break
                chunk += following.get("body", b"")
                more = following.get("more_body", False)
            if chunk:
                yield chunk
            if not more:
                return
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), _APP_EXIT_GRACE_S)
            task.cancel()


async def collect(app, request: ForwardedRequest, replica: str,
                  timeout: float | None = None) -> tuple[ResponseStart, bytes]:
    """The whole answer of a request (its ResponseStart's `elapsed` covers the body too); a 503 when the app takes
    longer than `timeout` (for /health, /metrics)."""
    began = time.perf_counter()

    async def run() -> tuple[ResponseStart, bytes]:
        start, body = None, b""
        async for item in replay(app, request, replica):
            if isinstance(item, ResponseStart):
                start = item
            else:
                body += item
        if start is None:
            raise RuntimeError(f"{request.path} ended without a response")
        start.elapsed = time.perf_counter() - began
        return start, body

    try:
        return await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        return ResponseStart(503, [(b"content-type", b"application/json")], replica), \
            b'{"status": "unresponsive"}'
