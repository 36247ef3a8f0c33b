"""The ASGI app: routers of the three APIs, error handlers, and the middleware guarding every request
(CORS, Host check against DNS rebinding, body size limit, API key)."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from ember import __version__
from ember.server import (
    anthropic_api,
    errors,
    llamacpp_api,
    lora_api,
    ollama_api,
    openai_api,
    openapi,
    rerank_api,
    webui,
)
from ember.server.body_text import body_text_error
from ember.server.errors import DECLARED_TYPE, APIError, error_body
from ember.server.generation import ClientGone
from ember.server.offload import BODY_BYTES
from ember.server.state import LEASES, ServerState

log = logging.getLogger("ember.server")

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
OPEN_PATHS = {"/health"}  # answered without an API key


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The host of a Host header without its port: "[::1]:8080" -> "::1", "a.b:80" -> "a.b"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def _send_error(scope, send, err: APIError) -> None:
    response = JSONResponse(error_body(scope.get("path", ""), err), status_code=err.status, headers=err.headers)
    await response(scope, _no_receive, send)


async def _no_receive():
    return {"type": "http.disconnect"}


class GuardMiddleware:
    """Host check, API key and body size limit, before any route runs (pure ASGI, so streams are untouched)."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.state.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if is_loopback(settings.host):
            allowed = LOOPBACK_NAMES | {settings.host.strip("[]").lower()}
            host = headers.get("host")
            if host is not None and _host_name(host) not in allowed:
                return await _send_error(scope, send, APIError(
                    400, f"Host {host!r} is not allowed: the server listens on a loopback address",
                    code="invalid_host"))
        path = scope.get("path", "")
        is_open = path in OPEN_PATHS or (settings.webui and webui.is_page_path(path))
        if settings.api_key and not is_open and scope.get("method") != "OPTIONS":
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return await _send_error(scope, send, APIError(
                    401, "invalid or missing API key (send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        limit = settings.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_error(scope, send, _too_large(limit))
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self._guarded(scope, receive, send)
        # Read the body here, bounded, so a chunked upload cannot outgrow the limit; then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _send_error(scope, send, _too_large(limit))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        bad_text = body_text_error(body)
        if bad_text is not None:
            return await _send_error(scope, send, bad_text)
        scope[BODY_BYTES] = len(body)
        replayed = False
        if not str(scope.get("path", "")).startswith("/v1/"):
            _read_as_json(scope, headers.get("content-type"))

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self._guarded(scope, replay, send)

    async def _guarded(self, scope, receive, send):
        """Run the app; a bug surfacing here is logged once and answered 500 (if nothing was sent yet). The models
        the request held (ServerState.use_model) are released once its response has ended, streams included."""
        started = False
        leases = scope[LEASES] = []

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _send_error(scope, send, errors.from_exception(exc))
        finally:
            self.state.release_admitted(scope)
            await self.state.release_all(leases)


def _read_as_json(scope, declared: str | None) -> None:
    """Ollama's and llama.cpp's servers parse a body as JSON whatever its declared type (curl -d sends
    application/x-www-form-urlencoded, as in Ollama's own documentation): so does ember, on their routes."""
    if declared is not None and declared.split(";", 1)[0].strip().lower() == "application/json":
        return
    scope[DECLARED_TYPE] = declared or "none"
    others = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
    scope["headers"] = [*others, (b"content-type", b"application/json")]


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the limit of {limit} bytes", code="body_too_large")


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(title="ember", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ember = state
    errors.install(app)
    openapi.install(app)  # GET /openapi.json

    @app.exception_handler(ClientGone)
    async def _gone(request, exc):
        return Response(status_code=499)

    if state.settings.webui:
        app.include_router(webui.router)  # before Ollama's "/", which it answers for non-browser clients
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(llamacpp_api.router)
    app.include_router(anthropic_api.router)
    app.include_router(rerank_api.router)
    app.include_router(lora_api.router)
    app.add_middleware(GuardMiddleware, state=state)
    if state.settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=state.settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], max_age=600)
    return app
