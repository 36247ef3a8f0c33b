"""Latency and throughput figures of one serving run, from the per-request timings `serve.py` records.

Definitions follow vLLM's benchmark so figures can be set beside its published ones:
TTFT = time to the first streamed token; TPOT = (E2E - TTFT) / (output tokens - 1), per request;
ITL = gap between consecutive streamed chunks; E2E = request sent to the end of its stream;
goodput = requests per second that met every SLO given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ember.errors import EmberError

LATENCIES = ("ttft", "tpot", "itl", "e2el")
STATISTICS = ("mean", "median", "p90", "p99")


class SLOError(EmberError):
    """A --goodput service-level objective is malformed."""


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # seconds, end to end
    itl: list[float] = field(default_factory=list)  # seconds between streamed chunks
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el"):
            raise SLOError(f"--goodput {item!r}: the metric must be ttft, tpot or e2el")
        try:
            slos[name] = float(value)
        except ValueError:
            raise SLOError(f"--goodput {item!r}: expected NAME:MILLISECONDS, e.g. ttft:500") from None
        if slos[name] <= 0:
            raise SLOError(f"--goodput {item!r}: the limit must be positive")
    return slos


def _meets(result: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": result.ttft, "tpot": result.tpot or 0.0, "e2el": result.latency}
    return all(values[name] * 1000 <= limit for name, limit in slos.items())


def _statistics(prefix: str, seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {f"{prefix}_{stat}_ms": None for stat in STATISTICS}
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    return {
        f"{prefix}_mean_ms": float(ms.mean()),
        f"{prefix}_median_ms": float(np.median(ms)),
        f"{prefix}_p90_ms": float(np.percentile(ms, 90)),
        f"{prefix}_p99_ms": float(np.percentile(ms, 99)),
    }


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float] | None = None) -> dict:
    """One flat dict of figures (flat so it goes straight into CSV columns and plots)."""
    done = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    duration = max(duration, 1e-9)
    summary: dict = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    if slos:
        summary["goodput"] = sum(_meets(r, slos) for r in done) / duration
    summary |= _statistics("ttft", [r.ttft for r in done])
    summary |= _statistics("tpot", [r.tpot for r in done if r.tpot is not None])
    summary |= _statistics("itl", [gap for r in done for gap in r.itl])
    summary |= _statistics("e2el", [r.latency for r in done])
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        summary["errors"] = errors[:5]
    return summary
