"""`ember tokenize MODEL TEXT`: show how a model's tokenizer splits text."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    parser = sub.add_parser("tokenize", help="show the tokens of a text",
                            description="Tokenize TEXT with MODEL's tokenizer (a GGUF file, even vocabulary-only, or a folder).")
    parser.add_argument("model", help="GGUF file or folder with tokenizer.json")
    parser.add_argument("text", help="text to tokenize")
    parser.add_argument("--ids", action="store_true", help="print only the token ids, as a JSON list")
    parser.add_argument("--no-bos", action="store_true", help="do not add the BOS token")


def run(args: argparse.Namespace) -> int:
    from ember.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    ids = tokenizer.encode(args.text, add_special_tokens=not args.no_bos)
    if args.ids:
        print(json.dumps(ids))
        return 0
    for token_id in ids:
        print(f"{token_id:>8}  {tokenizer.id_to_piece(token_id)!r}")
    return 0
