"""`ember cp SRC DST`: give a stored model another name (no data is copied)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    parser = sub.add_parser("cp", help="copy a model to a new name",
                            description="Register DST as another name for SRC in ember's store (same files).")
    parser.add_argument("src", metavar="SRC", help="a stored model, family[:tag]")
    parser.add_argument("dst", metavar="DST", help="the new name, family[:tag]")


def run(args: argparse.Namespace) -> int:
    from ember.store.store import ModelStore

    manifest = ModelStore().copy(args.src, args.dst)
    print(f"copied {args.src} → {manifest.name}")
    return 0
