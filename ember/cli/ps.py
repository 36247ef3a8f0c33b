"""`ember ps`: the models a running `ember serve` has loaded (GET /api/ps)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime

DEFAULT_HOST = "http://127.0.0.1:8080"


def add_host_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None,
                        help=f"the server's URL (default: $EMBER_HOST or {DEFAULT_HOST})")
    parser.add_argument("--api-key", default=None, help="the server's API key (default: $EMBER_API_KEY)")


def server_url(args: argparse.Namespace) -> str:
    host = (args.host or os.environ.get("EMBER_HOST") or DEFAULT_HOST).strip().rstrip("/")
    if "://" not in host:
        host = f"http://{host}"
    return host


def request(args: argparse.Namespace, method: str, path: str, body: dict | None = None):
    """The server's JSON answer; a one-line EmberError when there is no server or it answers an error."""
    import httpx

    from ember.errors import EmberError

    url = server_url(args)
    key = args.api_key or os.environ.get("EMBER_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=60)
    except httpx.HTTPError:
        raise EmberError(f"no ember server at {url}; start one with `ember serve`") from None
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code >= 400:
        message = data.get("error") if isinstance(data, dict) else None
        if isinstance(message, dict):
            message = message.get("message")
        raise EmberError(f"{url}: {message or f'HTTP {response.status_code}'}")
    return data


def add_parser(sub) -> None:
    parser = sub.add_parser("ps", help="list the models a running server has loaded",
                            description="List the models loaded by a running `ember serve`.")
    add_host_options(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _size(n: int) -> str:
    from ember.store.info import format_size

    return format_size(n) if n else "-"


def _until(expires_at: str | None) -> str:
    if not expires_at:
        return "-"
    try:
        when = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return expires_at
    seconds = when - time.time()
    if seconds > 100 * 365 * 86400:
        return "Forever"
    if seconds <= 0:
        return "now"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} from now"
    return "now"


def run(args: argparse.Namespace) -> int:
    models = (request(args, "GET", "/api/ps") or {}).get("models", [])
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    rows = [("NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL")]
    for m in models:
        size, vram = m.get("size") or 0, m.get("size_vram") or 0
        processor = "100% GPU" if size and vram >= size else ("CPU" if not vram else f"{100 * vram // size}% GPU")
        rows.append((m.get("name", "?"), _size(size), processor, str(m.get("context_length") or "-"),
                     _until(m.get("expires_at"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    sys.stdout.flush()
    return 0
