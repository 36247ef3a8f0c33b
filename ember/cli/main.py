"""`ember` command line: one sub-command per module, errors as one line (`--debug` for the traceback)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ember import __version__

# sub-command -> module with add_parser(subparsers) and run(args); imported lazily to keep --help fast
COMMANDS = {
    "run": "ember.cli.run",
    "serve": "ember.cli.serve",
    "tokenize": "ember.cli.tokenize",
    "bench": "ember.cli.bench",
    "recommend": "ember.cli.recommend",
    "pull": "ember.cli.pull",
    "ls": "ember.cli.ls",
    "rm": "ember.cli.rm",
    "show": "ember.cli.show",
    "cp": "ember.cli.cp",
    "ps": "ember.cli.ps",
    "stop": "ember.cli.stop",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Run and serve LLMs locally (GGUF and safetensors).")
    parser.add_argument("--version", action="version", version=f"ember {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `ember run MODEL --raw some words`: words after an option still belong to the prompt.
    if extra and isinstance(getattr(args, "prompt", None), list) and not any(e.startswith("-") for e in extra):
        args.prompt += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 0
    from ember.errors import EmberError

    try:
        return importlib.import_module(COMMANDS[args.command]).run(args) or 0
    except EmberError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
