"""The HTTP ingress of a Ray Serve deployment of ember: every request is read, keyed by its prompt's prefix
(ember.cluster.prefix) and relayed to the replica the router picks (ember.cluster.router); the answer streams
back chunk by chunk. /health and /metrics ask every replica and merge the answers (ember.cluster.aggregate).

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
from ember.cluster.prefix import routing_key
from ember.server.errors import APIError, error_body, error_response
from ember.server.metrics import CONTENT_TYPE
from ember.server.openai_api import sse

log = logging.getLogger("ray.serve")  # Serve writes it to the replica's log file

REPLICA_HEADER = b"x-ember-replica"
REPLICA_TIMEOUT_S = 5.0  # for one replica's /health or /metrics: one that takes longer answers "unresponsive"
FAN_OUT_TIMEOUT_S = 10.0  # for them all (Ray Serve's broadcast has one deadline for every replica)


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


class EmberIngress:
    def __init__(self, replicas, max_body_bytes: int):
        self.replicas = replicas
        self.forward = replicas.options(method_name="forward", stream=True)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, request: Request) -> Response:
        body = await self._body(request)
        began = time.perf_counter()
        forwarded = ForwardedRequest(
            request.method, request.url.path, request.scope.get("query_string", b""),
            list(request.scope.get("headers", [])), body,
            tuple(request.scope["client"]) if request.scope.get("client") else None, routing_key(body))
        if request.method == "GET" and forwarded.path == "/health":
            return await self._health(forwarded)
        if request.method == "GET" and forwarded.path == "/metrics":
            return await self._metrics(forwarded)
        return await self._relay(forwarded, began)

    async def _body(self, request: Request) -> bytes:
        """The body, read up to one byte past the limit: the replica's guard answers 413 for what is over."""
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body_bytes:
                break
        return b"".join(chunks)

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
        added_ms = (time.perf_counter() - began - start.elapsed) * 1e3
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
        response.raw_headers = [*start.headers, (REPLICA_HEADER, start.replica.encode()),
                                (b"server-timing", f"ingress;dur={added_ms:.2f}".encode())]
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
