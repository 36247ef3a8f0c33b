"""`ember ls [--all] [--json]`: models in ember's store (and, with --all, those other tools downloaded)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    parser = sub.add_parser("ls", aliases=["list"], help="list models",
                            description="List the models in ember's store; --all adds models found in the "
                                        "Hugging Face cache, Ollama, LM Studio and $EMBER_MODELS_PATH.")
    parser.add_argument("--all", "-a", action="store_true", help="also list models other tools downloaded")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(command="ls")


def rows(include_discovered: bool) -> list[dict]:
    from ember.store.store import ModelStore

    found = []
    for manifest in ModelStore().list():
        details = manifest.details
        found.append({"name": manifest.name, "size": manifest.size, "format": manifest.format,
                      "quant": details.get("quant"), "parameters": details.get("parameters"),
                      "modified": manifest.created, "source": "store",
                      "origin": manifest.source.get("repo") or manifest.source.get("copied_from")})
    if include_discovered:
        from ember.store.discovery import discover_all

        for model in discover_all():
            quant, params = model.quant, None
            try:
                from ember.store.info import describe_path

                details = describe_path(model.path)
                quant, params = details.get("quant") or quant, details.get("parameters")
            except Exception as err:  # a broken file is still listed
                log.debug("cannot describe %s: %s", model.path, err)
            found.append({"name": model.name, "size": model.size, "format": model.format, "quant": quant,
                          "parameters": params, "modified": model.modified, "source": model.source,
                          "path": str(model.path)})
    return found


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

    from ember.store.info import format_params, format_size

    found = rows(args.all)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = ["NAME", "SIZE", "FORMAT", "QUANT", "PARAMS", "MODIFIED"] + (["SOURCE"] if args.all else [])
    for column in columns:
        table.add_column(column, no_wrap=True, justify="right" if column in ("SIZE", "PARAMS") else "left")
    for row in found:
        cells = [row["name"], format_size(row["size"]), row["format"], row["quant"] or "-",
                 format_params(row["parameters"]), _ago(row["modified"])]
        table.add_row(*cells, *([row["source"]] if args.all else []))
    console = Console(width=None if sys.stdout.isatty() else 400, highlight=False)
    if not found:
        print("no models; `ember pull org/repo:Q4_K_M` downloads one" +
              ("" if args.all else " (`ember ls --all` shows other tools' models)"))
        return 0
    console.print(table)
    return 0
