"""Ollama's keep_alive: how long a model stays loaded after its last request, as seconds or a Go duration."""

from __future__ import annotations

import re
from typing import Any

from ember.server.errors import bad_request

DEFAULT_KEEP_ALIVE = 300.0
FOREVER = 100 * 365 * 86400.0  # longer than this is forever: a date past year 9999 cannot even be shown
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_keep_alive(value: Any, default: float | None = DEFAULT_KEEP_ALIVE) -> float | None:
    """Seconds to keep a model loaded after its last request; None: forever. Accepts numbers (seconds) and
    Go-style durations ("5m", "1h30m", "-1"); None or "" gives `default`; negative or over a century: forever."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise bad_request("keep_alive: expected a number of seconds or a duration like '5m'", param="keep_alive")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not parts or "".join(n + u for n, u in parts) != body:
                raise bad_request(f"keep_alive: {value!r} is not a duration (e.g. 30s, 5m, 1h, -1)",
                                  param="keep_alive") from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds != seconds:  # NaN
        raise bad_request("keep_alive: not a number", param="keep_alive")
    return None if seconds < 0 or seconds > FOREVER else seconds
