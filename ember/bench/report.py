"""Benchmark records as a rich table (for people), Markdown (for issues and READMEs), JSON or CSV (for tools).

A record is a plain dict: metadata (ember version, hardware, model or server settings) plus a list of
result rows. JSON keeps everything; CSV flattens one row per result with the metadata repeated so each
line stands alone when files from several machines are concatenated.
"""

from __future__ import annotations

import csv
import io
import json
import math

from rich.table import Table

from ember.bench.metrics import LATENCIES, STATISTICS

GB = 1e9
LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E"}

SERVE_ROWS = [
    ("completed", "requests ok", "{:d}"),
    ("failed", "requests failed", "{:d}"),
    ("duration_s", "duration s", "{:.2f}"),
    ("input_tokens", "input tokens", "{:d}"),
    ("output_tokens", "output tokens", "{:d}"),
    ("request_throughput", "requests/s", "{:.2f}"),
    ("goodput", "goodput req/s", "{:.2f}"),
    ("output_throughput", "output tok/s", "{:.1f}"),
    ("total_token_throughput", "total tok/s", "{:.1f}"),
] + [
    (f"{metric}_{stat}_ms", f"{LATENCY_NAMES[metric]} {stat} ms", "{:.1f}")
    for metric in LATENCIES for stat in STATISTICS
]


def _fmt(template: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return template.format(value)


def _markdown(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---:" if i in right else "---" for i in range(len(headers))) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def to_json(record: dict) -> str:
    return json.dumps(record, indent=2, default=str)


# offline (`ember bench MODEL`)

OFFLINE_HEADERS = ["model", "size", "params", "quant", "dtype", "device", "threads", "test", "c", "t/s"]


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 2**30:.2f} GiB" if size_bytes >= 2**30 else f"{size_bytes / 2**20:.1f} MiB"


def _count(params: int) -> str:
    return f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M"


def _rate(result: dict) -> str:
    return f"{result['tokens_per_s_mean']:.2f} ± {result['tokens_per_s_sd']:.2f}"


SPEC_HEADERS = ("accept rate", "accepted len")


def _speculation(result: dict) -> list[str]:
    """Speculative decoding's measured acceptance rate and mean accepted length (blank where nothing was
    verified, e.g. a pp test)."""
    if "spec_acceptance_rate" not in result:
        return ["", ""]
    return [f"{result['spec_acceptance_rate']:.2f}", f"{result['spec_mean_accepted_length']:.2f}"]


def _offline_rows(record: dict) -> list[list[str]]:
    """llama-bench's layout: every row names its model, so tables from several runs can be merged."""
    model = record["model"]
    return [[model["name"], _size(model["size_bytes"]), _count(model["params"]), model["quant"], model["dtype"],
             model["device"], str(r["threads"]), r["test"], str(r["concurrency"]), _rate(r)]
            for r in record["results"]]


def offline_caption(record: dict) -> str:
    hw = record["hardware"]
    gpus = ", ".join(g["name"] for g in hw["gpus"]) or "no GPU"
    return (f"ember {record['ember_version']} · {hw['cpu_model']} ({hw['physical_cores']} cores, "
            f"{' '.join(hw['cpu_features']) or 'no SIMD flags'}) · {hw['ram_bytes'] / GB:.0f} GB RAM · {gpus} · "
            f"{record['repetitions']} repetitions")


def offline_table(record: dict) -> Table:
    """One model per run, so its facts go in the title and the rows keep only what varies."""
    model = record["model"]
    table = Table(title=f"{model['name']} · {model['quant']} · {_size(model['size_bytes'])} · "
                        f"{_count(model['params'])} params · {model['dtype']} on {model['device']}",
                  caption=offline_caption(record))
    speculative = any("spec_acceptance_rate" in r for r in record["results"])
    for header in ("test", "c", "threads", "t/s", "t/s per sequence") + (SPEC_HEADERS if speculative else ()):
        table.add_column(header, justify="left" if header == "test" else "right", no_wrap=True)
    for r in record["results"]:
        per_sequence = r["tokens_per_s_mean"] / r["concurrency"] if r["n_gen"] else None
        table.add_row(r["test"], str(r["concurrency"]), str(r["threads"]), _rate(r),
                      f"{per_sequence:.2f}" if per_sequence is not None else "",
                      *(_speculation(r) if speculative else ()))
    return table


def offline_markdown(record: dict) -> str:
    headers, rows = OFFLINE_HEADERS, _offline_rows(record)
    if any("spec_acceptance_rate" in r for r in record["results"]):
        headers = headers + list(SPEC_HEADERS)
        rows = [row + _speculation(r) for row, r in zip(rows, record["results"], strict=True)]
    right = {i for i, h in enumerate(headers) if h in ("size", "params", "threads", "c", "t/s", *SPEC_HEADERS)}
    return _markdown(headers, rows, right) + f"\n\n{offline_caption(record)}\n"


def offline_csv(record: dict) -> str:
    hw, model = record["hardware"], record["model"]
    meta = {
        "ember_version": record["ember_version"], "cpu": hw["cpu_model"], "cores": hw["physical_cores"],
        "ram_bytes": hw["ram_bytes"], "gpu": ";".join(g["name"] for g in hw["gpus"]),
        **{f"model_{k}": v for k, v in model.items()},
    }
    rows = [{**meta, **{k: v for k, v in r.items() if k != "tokens_per_s_samples"}} for r in record["results"]]
    return _csv(rows)


# serving (`ember bench serve`)

def run_title(run: dict, separator: str = " · ") -> str:
    rate = run["request_rate"]
    rate_text = "" if rate is None else f" {rate:g} req/s"
    return f"{run['label']}{separator}c={run['max_concurrency'] or '∞'}{rate_text}"


def _serve_rows(record: dict) -> list[list[str]]:
    runs = record["runs"]
    rows = []
    for key, label, template in SERVE_ROWS:
        if all(run.get(key) is None for run in runs):
            continue  # e.g. goodput without --goodput
        rows.append([label] + [_fmt(template, run.get(key)) for run in runs])
    return rows


def serve_table(record: dict) -> Table:
    settings = record["settings"]
    table = Table(title=f"ember bench serve · {settings['dataset']} · {settings['num_prompts']} prompts",
                  caption=serve_caption(record))
    table.add_column("metric", no_wrap=True)
    for run in record["runs"]:
        table.add_column(run_title(run, "\n"), justify="right", overflow="fold")
    for row in _serve_rows(record):
        table.add_row(*row)
    return table


def serve_caption(record: dict) -> str:
    settings = record["settings"]
    exact = "token-exact" if settings["exact_lengths"] else "approximate"
    slos = " ".join(f"{k}:{v:g}" for k, v in settings["goodput"].items()) or "none"
    return (f"ember {record['ember_version']} · endpoint {settings['endpoint']} · prompt lengths {exact} · "
            f"SLOs {slos}")


def serve_markdown(record: dict) -> str:
    headers = ["metric"] + [run_title(run) for run in record["runs"]]
    right = set(range(1, len(headers)))
    return _markdown(headers, _serve_rows(record), right) + f"\n\n{serve_caption(record)}\n"


def serve_csv(record: dict) -> str:
    rows = [{k: v for k, v in run.items() if k != "errors"} for run in record["runs"]]
    return _csv(rows)
