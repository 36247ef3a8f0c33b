"""`ember stop MODEL`: unload a model from a running `ember serve` (Ollama's keep_alive 0 request)."""

from __future__ import annotations

import argparse

from ember.cli.ps import add_host_options, request


def add_parser(sub) -> None:
    parser = sub.add_parser("stop", help="unload a model from a running server",
                            description="Unload MODEL from a running `ember serve` (at once if it is idle, else "
                                        "when its requests finish).")
    parser.add_argument("model", metavar="MODEL", help="the model's name, as `ember ps` shows it")
    add_host_options(parser)


def run(args: argparse.Namespace) -> int:
    request(args, "POST", "/api/generate", {"model": args.model, "keep_alive": 0})
    return 0
