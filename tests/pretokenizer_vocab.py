"""A small byte-level BPE vocabulary that makes pre-tokenizer splits visible in token ids.

Every substring of up to `MAX_PIECE` byte-level characters of the given texts is a token, and every way of
cutting such a substring in two is a merge, shorter results ranked first. BPE therefore merges each
pre-token of up to `MAX_PIECE` bytes into exactly one token, and never across pre-tokens, so two
tokenizers that give the same ids for these texts cut them into the same pieces (longer pieces become
several tokens, still never crossing a cut). scripts/pretokenizer_vectors.py writes this vocabulary to a
GGUF file for llama.cpp; tests/test_pretokenizers.py builds ember's tokenizer from the same metadata.
"""

from __future__ import annotations

MAX_PIECE = 8


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte (byte-level BPE vocabularies spell tokens with these)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return [chars[byte] for byte in range(256)]


BYTE_CHARS = _byte_chars()


def byte_level(text: str) -> str:
    return "".join(BYTE_CHARS[byte] for byte in text.encode("utf-8"))


def synthetic_vocab(texts: list[str]) -> tuple[list[str], list[str]]:
    """(tokens, merges) as `tokenizer.ggml.tokens` / `tokenizer.ggml.merges` spell them."""
    tokens = list(BYTE_CHARS)
    known = set(tokens)
    pieces = set()
    for text in texts:
        symbols = byte_level(text)
        for start in range(len(symbols)):
            for end in range(start + 2, min(start + MAX_PIECE, len(symbols)) + 1):
                pieces.add(symbols[start:end])
    merges = []
    for piece in sorted(pieces, key=lambda piece: (len(piece), piece)):
        if piece not in known:
            known.add(piece)
            tokens.append(piece)
        merges.extend(f"{piece[:cut]} {piece[cut:]}" for cut in range(1, len(piece)))
    return tokens, merges


def synthetic_metadata(texts: list[str], pre: str) -> dict:
    """GGUF tokenizer metadata (as ember reads it) of the synthetic vocabulary with `tokenizer.ggml.pre`."""
    tokens, merges = synthetic_vocab(texts)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(tokens),
        "tokenizer.ggml.merges": merges,
    }
