"""The HTTP ingress of a Ray Serve deployment of ember: an ASGI app, served by uvicorn in the `ember serve`
process itself (no Serve HTTP proxy, no ingress actor: one Ray hop per request, not three). Every request is
read, keyed by its prompt's prefix (ember.cluster.prefix) and relayed through a deployment handle to the replica
the router picks (ember.cluster.router). An answer the client wants streamed comes back chunk by chunk; any other
comes back whole from one call (one Ray message each way, no generator). /health and /metrics ask every replica
and merge the answers (ember.cluster.aggregate).

Every relayed response says what the ingress added to it: `Server-Timing: ingress;dur=MS` is the time from the
body read to the response start, less the replica's own part (the routing key, the router, the Ray hops).

A replica that dies fails its requests cleanly: one that had not answered yet gets a 503 in its API's error
format; a stream already under way ends with an error event (SSE) or error line (NDJSON), as ember ends a
stream whose engine fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ember.cluster.aggregate import merge_health, merge_metrics
from ember.cluster.forwarding import ForwardedRequest, ResponseStart
from ember.cluster.prefix import parse_body, prefix_key
from ember.server.errors import APIError, error_body, error_response
from ember.server.metrics import CONTENT_TYPE
from ember.server.openai_api import sse

log = logging.getLogger("ember.cluster")

REPLICA_HEADER = b"x-ember-replica"
REPLICA_TIMEOUT_S = 5.0  # for one replica's /health or /metrics: one that takes longer answers "unresponsive"
FAN_OUT_TIMEOUT_S = 10.0  # for them all (Ray Serve's broadcast has one deadline for every replica)
# Requests go straight to the replica's inter-deployment gRPC server (token-authenticated, TLS when Ray's is on),
# pickled: a third of the CPU of a Ray actor call with cloudpickle, on both ends (docs/scale-out.md, "Measured").
TRANSPORT = {"_by_reference": False, "request_serialization": "pickle", "response_serialization": "pickle"}


def stream_error(path: str, content_type: str, err: APIError) -> bytes:
    """The last chunk of a stream whose replica failed, in the stream's own format ("" when it has none)."""
    if content_type.startswith("text/event-stream"):
        if path.startswith("/v1/responses"):
            return sse({"type": "error", "code": err.code, "message": err.message, "param": err.param},
                       event="error").encode()
        return (sse(error_body(path, err)) + sse("[DONE]")).encode()
    if content_type.startswith("application/x-ndjson"):
        return (json.dumps(error_body(path, err)) + "\n").encode()
    return b""


def replica_failed(err: BaseException) -> APIError:
    return APIError(503, f"the replica serving this request failed ({type(err).__name__}); retry the request",
                    code="replica_failed", headers={"Retry-After": "1"})


def wants_stream(path: str, body: dict | None) -> bool:
    """Whether the answer may be a stream: `"stream": true`, or no `stream` field on an API whose default is to
    stream (Ollama's /api/*). Only decides the transport: a streamed answer relayed whole is still right."""
    if body is None:
        return False
    stream = body.get("stream")
    return bool(stream) if stream is not None else path.startswith("/api/")


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the rest of a body read only up to its limit is skipped)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EmberIngress:
    """The ASGI app; `replicas` is a deployment handle to the EmberReplica deployment; `on_shutdown` (blocking,
    run in a thread) takes the application down when the server stops."""

    def __init__(self, replicas, max_body_bytes: int, on_shutdown=None):
        self.replicas = replicas
        self.max_body_bytes = max_body_bytes
        self.on_shutdown = on_shutdown
        self.forward = self.answer = None  # the handle's per-method copies, made on the serving event loop

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":  # websockets are not served
            response = await self.handle(Request(scope, receive))
            await response(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        """The handle's router runs on the server's event loop (no thread hop per request): it is made when the
        loop starts; the application is taken down and the router shut down before the loop ends (the router
        follows the application's updates until then)."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.replicas._init(_run_router_in_separate_loop=False)
                self.forward = self.replicas.options(method_name="forward", stream=True, **TRANSPORT)
                self.answer = self.replicas.options(method_name="answer", **TRANSPORT)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.on_shutdown is not None:
                    await asyncio.to_thread(self.on_shutdown)
                await self.replicas.shutdown_async()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle(self, request: Request) -> Response:
        body = await self._body(request)
        began = time.perf_counter()
        # A body over the limit is refused by the replica: it must not claim prefixes in the router's table.
        parsed = parse_body(body) if len(body) <= self.max_body_bytes else None
        forwarded = ForwardedRequest(
            request.method, request.url.path, request.scope.get("query_string", b""),
            list(request.scope.get("headers", [])), body,
            tuple(request.scope["client"]) if request.scope.get("client") else None, prefix_key(parsed))
        if request.method == "GET" and forwarded.path == "/health":
            return await self._health(forwarded)
        if request.method == "GET" and forwarded.path == "/metrics":
            return await self._metrics(forwarded)
        if wants_stream(forwarded.path, parsed):
            return await self._relay(forwarded, began)
        return await self._relay_whole(forwarded, began, request)

    async def _body(self, request: Request) -> bytes:
        """The body, read up to one byte past the limit: the replica's guard answers 413 for what is over."""
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body_bytes:
                break
        return b"".join(chunks)

    async def _relay_whole(self, forwarded: ForwardedRequest, began: float, request: Request) -> Response:
        """One call that returns the whole answer; the call is cancelled (the replica aborts) if the client
        leaves first."""
        call = self.answer.remote(forwarded)
        answer = asyncio.ensure_future(call)
        gone = asyncio.ensure_future(_disconnect(request))
        try:
            await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the server is stopping
            call.cancel()
            raise
        finally:
            gone.cancel()
        if not answer.done():
            call.cancel()
            answer.cancel()
            return Response(status_code=499)  # nobody is there to read it
        try:
            start, body = answer.result()
        except Exception as err:  # the replica died, or was taken away, before it answered
            log.warning("%s %s failed on its replica: %r", forwarded.method, forwarded.path, err)
            return error_response(forwarded.path, replica_failed(err))
        response = Response(body, status_code=start.status)
        response.raw_headers = [*start.headers, *self._added(start, began)]
        return response

    @staticmethod
    def _added(start: ResponseStart, began: float) -> list[tuple[bytes, bytes]]:
        """The headers the ingress adds: the replica's name, and its own time (less the replica's)."""
        added_ms = (time.perf_counter() - began - start.elapsed) * 1e3
        return [(REPLICA_HEADER, start.replica.encode()), (b"server-timing", f"ingress;dur={added_ms:.2f}".encode())]

    async def _relay(self, forwarded: ForwardedRequest, began: float) -> Response:
        stream = self.forward.remote(forwarded)
        try:
            start = await stream.__anext__()
        except asyncio.CancelledError:  # the client left first: the replica's work is cancelled with it
            stream.cancel()
            raise
        except Exception as err:  # the replica died, or was taken away, before it answered
            stream.cancel()
            log.warning("%s %s failed on its replica: %r", forwarded.method, forwarded.path, err)
            return error_response(forwarded.path, replica_failed(err))
        assert isinstance(start, ResponseStart)
        added = self._added(start, began)
        content_type = start.header(b"content-type")

        async def chunks():
            finished = False
            try:
                async for chunk in stream:
                    yield chunk
                finished = True
            except Exception as err:  # the replica died mid-answer
                log.warning("%s %s failed mid-stream on replica %s: %r", forwarded.method, forwarded.path,
                            start.replica, err)
                ending = stream_error(forwarded.path, content_type, replica_failed(err))
                if not ending:
                    raise  # a plain body cut short: the client sees the connection end early
                yield ending
                finished = True
            finally:
                if not finished:
                    stream.cancel()

        response = StreamingResponse(chunks(), status_code=start.status)
        response.raw_headers = [*start.headers, *added]
        return response

    async def _fan_out(self, forwarded: ForwardedRequest) -> tuple[dict[str, tuple[ResponseStart, bytes]], int]:
        """Every replica's answer to `forwarded`, by replica name, and how many replicas did not answer."""
        try:
            answers = await self.replicas.broadcast("probe", forwarded, REPLICA_TIMEOUT_S).results_async(
                timeout_s=FAN_OUT_TIMEOUT_S, return_exceptions=True)
        except Exception as err:  # no replica (all are being replaced), or one stuck past the deadline
            log.warning("the replicas did not answer %s: %r", forwarded.path, err)
            return {}, 0
        found = {}
        for answer in answers:
            if isinstance(answer, BaseException):
                log.warning("a replica did not answer %s: %r", forwarded.path, answer)
            else:
                found[answer[0].replica] = answer
        return found, len(answers) - len(found)

    async def _health(self, forwarded: ForwardedRequest) -> Response:
        answers, failed = await self._fan_out(forwarded)
        states = {}
        for name, (start, body) in answers.items():
            try:
                states[name] = "ok" if start.status == 200 else str(json.loads(body).get("status", "unavailable"))
            except (ValueError, AttributeError):
                states[name] = "unavailable"
        status, body = merge_health(states, failed)
        return JSONResponse(body, status_code=status, headers=None if status == 200 else {"Retry-After": "1"})

    async def _metrics(self, forwarded: ForwardedRequest) -> Response:
        texts = {}
        answers, _ = await self._fan_out(forwarded)
        for name, (start, body) in answers.items():
            if start.status != 200:  # refused (API key, Host): every replica answers alike, pass it on
                return Response(body, status_code=start.status, headers=dict(
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in start.headers if k != b"content-length"))
            texts[name] = body.decode()
        return Response(merge_metrics(texts), media_type=CONTENT_TYPE)
