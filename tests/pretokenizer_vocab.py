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


def write_synthetic_gguf(path, texts: list[str], pre: str) -> None:
    """The synthetic vocabulary as a vocabulary-only GGUF file (llama.cpp reads an architecture's
    hyperparameters even then, so a tiny qwen2 shape is declared)."""
    import gguf

    metadata = synthetic_metadata(texts, pre)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model(metadata["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    writer.add_token_merges(metadata["tokenizer.ggml.merges"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
