"""`ember rm NAME...`: remove models from ember's store (blobs other models share are kept)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    parser = sub.add_parser("rm", help="remove a model from the store",
                            description="Remove models from ember's store. Models found in other tools' folders "
                                        "(ember ls --all) are theirs to remove.")
    parser.add_argument("names", nargs="+", metavar="NAME", help="family[:tag] as `ember ls` shows it")


def run(args: argparse.Namespace) -> int:
    from ember.errors import ModelLoadError
    from ember.store.names import parse_ref, refuse_reserved
    from ember.store.store import ModelStore

    store = ModelStore()
    for name in args.names:
        refuse_reserved(name, "removed")
        ref = parse_ref(name, allow_paths=False)
        if ref.kind != "store":
            raise ModelLoadError(f"{name!r} is not in ember's store; remove it with the tool that made it")
        if not store.exists(ref.store_name):
            raise ModelLoadError(f"model {ref.store_name!r} is not in the store")
        store.remove(ref.store_name)
        print(f"deleted {ref.store_name}")
    return 0
