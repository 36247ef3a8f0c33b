"""`ember pull REF`: download a model from Hugging Face into ember's store."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    parser = sub.add_parser("pull", help="download a model from Hugging Face",
                            description="Download org/repo[:QUANT|:file.gguf] from Hugging Face into the model "
                                        "store ($EMBER_HOME or ~/.ember). Without QUANT a GGUF repo gives "
                                        "Q4_K_M; a repo without GGUF files gives its safetensors checkpoint.")
    parser.add_argument("ref", metavar="REF", help="org/repo, org/repo:Q4_K_M or org/repo:file.gguf")
    parser.add_argument("--name", default=None, help="store it as NAME (family[:tag]) instead of repo:quant")
    parser.add_argument("--revision", default=None, help="branch, tag or commit to pull (default: main)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from ember.store.pull import pull

    manifest = pull(args.ref, name=args.name, revision=args.revision, progress=not args.quiet)
    print(manifest.name)
    return 0
