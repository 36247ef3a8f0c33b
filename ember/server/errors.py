"""Errors as HTTP responses: OpenAI's `{"error": {...}}` everywhere except Ollama's `{"error": "..."}` on /api/*
and Anthropic's `{"type": "error", "error": {...}}` on /v1/messages."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ember.errors import (
    ChatTemplateError,
    EmberError,
    InvalidParameter,
    LoraError,
    LoraInUse,
    LoraNotFound,
    OutOfResources,
    TokenizerError,
)

DECLARED_TYPE = "ember.declared_content_type"  # ASGI scope key: the Content-Type a JSON-read body came with
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 501: "not_implemented_error", 503: "service_unavailable_error"}


class APIError(Exception):
    """An HTTP error with the fields of OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_supported(what: str, param: str | None = None) -> APIError:
    return APIError(400, f"{what} is not supported yet", param=param, code="unsupported")


def model_not_found(name: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")


def queue_full() -> APIError:
    return APIError(503, "the server is busy: its request queue is full; retry shortly", code="queue_full",
                    headers={"Retry-After": "1"})


def is_ollama_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# Anthropic's error types by status (its SDK picks the exception class from the status alone).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error"}


def anthropic_error(err: APIError) -> dict:
    kind = _ANTHROPIC_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def error_body(path: str, err: APIError) -> dict:
    if is_ollama_path(path):
        return {"error": err.message}
    if is_anthropic_path(path):
        return anthropic_error(err)
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(path: str, err: APIError) -> JSONResponse:
    return JSONResponse(error_body(path, err), status_code=err.status, headers=err.headers)


def from_exception(exc: BaseException) -> APIError:
    """Map ember's own errors (raised by the engine, tokenizer, template or SamplingParams) to HTTP errors."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidParameter):
        return bad_request(str(exc), param=exc.field, code="invalid_parameter")
    if isinstance(exc, ChatTemplateError):
        return bad_request(str(exc), param="messages", code="chat_template_error")
    if isinstance(exc, TokenizerError):
        return bad_request(str(exc), code="tokenizer_error")
    if isinstance(exc, LoraError):
        return bad_request(str(exc), param="lora_path", code="invalid_lora")
    if isinstance(exc, LoraNotFound):
        return APIError(404, str(exc), param="lora_name", code="lora_not_found")
    if isinstance(exc, LoraInUse):
        return APIError(409, str(exc), param="lora_name", code="lora_in_use")
    if isinstance(exc, OutOfResources):
        return APIError(503, str(exc), code="out_of_resources", headers={"Retry-After": "1"})
    if isinstance(exc, EmberError):
        return APIError(500, str(exc), type="server_error", code="engine_error")
    return APIError(500, "internal server error", type="server_error", code="internal_error")


def _validation_error(exc: RequestValidationError, declared: str | None = None) -> APIError:
    """`declared`: the Content-Type of a body read as JSON although it was not declared JSON (ember.server.app)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    kind = first.get("type", "")
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if kind == "unsupported_field":
        name = (first.get("ctx") or {}).get("field")
        return not_supported(name, param=name)
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        why = (f" (it was sent as Content-Type {declared}; on this route ember reads every body as JSON)"
               if declared else "")
        return bad_request(f"the request body is not valid JSON{': ' + detail if detail else ''}{why}",
                           code="invalid_json")
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return bad_request("the request body must be a JSON object (sent with Content-Type: application/json)",
                           code="invalid_body")
    # Drop the tags pydantic adds for union members ("str", "list[str]") so the path names the field.
    names = [str(p) for p in loc if isinstance(p, int) or not ("[" in p or p in _UNION_TAGS)]
    param = ".".join(names) or None
    message = first.get("msg", "invalid value")
    if kind == "missing":
        message = "this field is required"
    if len({tuple(e.get("loc", ())[:2]) for e in errors}) == 1 and len(errors) > 1:
        message = "; ".join(dict.fromkeys(e.get("msg", "") for e in errors))
    return bad_request(f"{param}: {message}" if param else message, param=param, code="invalid_value")


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "literal"}


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(request.url.path, _validation_error(exc, request.scope.get(DECLARED_TYPE)))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return error_response(request.url.path, APIError(exc.status_code, message, headers=exc.headers))

    @app.exception_handler(EmberError)
    async def _ember(request: Request, exc: EmberError):
        return error_response(request.url.path, from_exception(exc))
