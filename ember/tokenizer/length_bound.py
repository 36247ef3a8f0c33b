"""How many characters of text one token can stand for at most, so that a text's length alone proves it cannot
fit a context (ember.server.prompting refuses it before tokenizing it all).

`len(text) / max_chars_per_token` is a lower bound on the token count only when no step of the tokenizer can
drop characters or fold an unbounded run of them into one token. So the bound is given only for pipelines
known to keep every character: BPE where every character has a token (byte-level vocabularies, SentencePiece
byte fallback, or an unknown token per character), normalizers that never shrink text (NFC/NFKC by at most 4
code points to 1: the longest canonical decomposition), pre-tokenizers that remove nothing. Anything else
(WordPiece's whole-word [UNK], fused unknowns, BERT's cleaning, Strip, regex Replace) gets None: no bound.
A token's piece is at least as long as the text it covers: byte-level pieces have one character per byte,
byte-fallback pieces (<0x41>) six characters for one byte, `▁` one for a space."""

from __future__ import annotations

import json

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.pre_tokenizers import ByteLevel

# Normalizers that never make text shorter, and those that shorten it by at most a known factor.
_KEEPING_NORMALIZERS = {"Prepend", "Lowercase", "NFD", "NFKD"}
_COMPOSING_NORMALIZERS = {"NFC": 4, "NFKC": 4}
# Pre-tokenizers that only split or map characters (a Split removes nothing unless its behaviour says so).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "UnicodeScripts"}


def max_chars_per_token(hf: HFTokenizer) -> int | None:
    """The most input characters one token can cover; None when this tokenizer gives no such bound."""
    normalizer = _state(hf.normalizer)
    pre_tokenizer = _state(hf.pre_tokenizer)
    shrink = _shrink_factor(normalizer)
    if shrink is None or not _keeps_characters(pre_tokenizer) or not _every_character_has_a_token(hf, pre_tokenizer):
        return None
    longest = max(map(len, hf.get_vocab(with_added_tokens=True)), default=0)
    return longest * shrink if longest else None


def _state(component) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def _shrink_factor(normalizer: dict | None) -> int | None:
    """How many input characters at most become one normalized character; None when unbounded."""
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        factor = 1
        for part in normalizer.get("normalizers", []):
            inner = _shrink_factor(part)
            if inner is None:
                return None
            factor *= inner
        return factor
    if kind in _KEEPING_NORMALIZERS:
        return 1
    if kind in _COMPOSING_NORMALIZERS:
        return _COMPOSING_NORMALIZERS[kind]
    if kind == "Replace":
        pattern, content = normalizer.get("pattern", {}).get("String"), normalizer.get("content", "")
        if pattern is None or not content:
            return None  # a regex, or replacing with nothing, can remove any amount of text
        return max(1, -(-len(pattern) // len(content)))
    return None


def _keeps_characters(pre_tokenizer: dict | None) -> bool:
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return all(_keeps_characters(part) for part in pre_tokenizer.get("pretokenizers", []))
    return kind in _KEEPING_PRE_TOKENIZERS and pre_tokenizer.get("behavior") != "Removed"


def _every_character_has_a_token(hf: HFTokenizer, pre_tokenizer: dict | None) -> bool:
    """BPE that never drops a character nor folds a run of unknown ones into one token."""
    model = hf.model  # its attributes: serializing it would write out the whole vocabulary and merges
    if type(model).__name__ != "BPE":
        return False
    if _uses_byte_level(pre_tokenizer):
        return all(model.token_to_id(char) is not None for char in ByteLevel.alphabet())
    if model.byte_fallback:
        return all(model.token_to_id(f"<0x{byte:02X}>") is not None for byte in range(256))
    return model.unk_token is not None and not model.fuse_unk


def _uses_byte_level(pre_tokenizer: dict | None) -> bool:
    if pre_tokenizer is None:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_uses_byte_level(part) for part in pre_tokenizer.get("pretokenizers", []))
    return pre_tokenizer.get("type") == "ByteLevel"
