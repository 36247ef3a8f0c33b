"""The browser chat page: index.html, app.js, markdown.js and style.css of this folder, served at `/` and
`/ui/<file>` (no build step, no CDN; the page talks to the OpenAI API of the same server).

The page and its files are static and hold no secret, so they are served without the API key; the page asks
for the key and sends it as a Bearer token with every API call. `GET /` answers a browser (Accept: text/html)
with the page and any other client with the Ollama-style "ember is running" (`ember.server.ollama_api.root`)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from ember.server.errors import APIError
from ember.server.ollama_api import root as running

router = APIRouter()

ASSETS = {"app.js": "text/javascript", "markdown.js": "text/javascript", "style.css": "text/css"}
# Everything the page loads comes from this server; no inline script, so injected markup cannot run.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def is_page_path(path: str) -> bool:
    """Paths the page is served on (open without the API key)."""
    return path == "/" or path.startswith("/ui/")


def _file(name: str) -> bytes:
    return resources.files(__name__).joinpath(name).read_bytes()


@router.get("/")
async def page(request: Request):
    if "text/html" not in request.headers.get("accept", ""):
        return PlainTextResponse(await running())
    return Response(_file("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.api_route("/ui/{name}", methods=["GET", "HEAD"])
async def asset(name: str):
    if name not in ASSETS:
        raise APIError(404, f"no such file: /ui/{name}", code="not_found")
    return Response(_file(name), media_type=f"{ASSETS[name]}; charset=utf-8", headers=HEADERS)
