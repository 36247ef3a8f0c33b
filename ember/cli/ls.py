"""`ember ls [--all] [--json]`: models in ember's store (and, with --all, those other tools downloaded)."""

from __future__ import annotations

import argparse
import json
import sys
import time


def add_parser(sub) -> None:
    parser = sub.add_parser("ls", aliases=["list"], help="list models",
                            description="List the models in ember's store; --all adds models found in the "
                                        "Hugging Face cache, Ollama, LM Studio and $EMBER_MODELS_PATH.")
    parser.add_argument("--all", "-a", action="store_true", help="also list models other tools downloaded")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(command="ls")


def _ago(timestamp: float) -> str:
    if not timestamp:
        return "-"
    seconds = max(0, time.time() - timestamp)
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                       ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ember.store.catalog import list_models
    from ember.store.info import format_params, format_size

    found = [entry.to_json() for entry in list_models(include_discovered=args.all)]
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = ["NAME", "ID", "SIZE", "FORMAT", "QUANT", "PARAMS", "MODIFIED"] + (["SOURCE"] if args.all else [])
    for column in columns:
        table.add_column(column, no_wrap=True, justify="right" if column in ("SIZE", "PARAMS") else "left")
    for row in found:
        cells = [row["name"], (row["digest"] or "-")[:12], format_size(row["size"]), row["format"], row["quant"] or "-",
                 format_params(row["parameters"]), _ago(row["modified"])]
        table.add_row(*cells, *([row["source"]] if args.all else []))
    console = Console(width=None if sys.stdout.isatty() else 400, highlight=False)
    console.print(table)
    if len(found) == 1:
        print("no models but the bundled one; `ember pull org/repo:Q4_K_M` downloads one" +
              ("" if args.all else " (`ember ls --all` shows other tools' models)"))
    return 0
