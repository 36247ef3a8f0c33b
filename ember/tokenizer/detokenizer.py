"""Incremental detokenization for streaming: each new token yields only the text it completes.

Decoding token by token breaks two things: a multi-byte character split over byte-fallback tokens, and
SentencePiece's leading space, which the decoder strips from the first token of a string. So each step
decodes a short window that starts a few tokens back (`prefix`) and emits what the newest tokens added
beyond the window's already-emitted part (`read`); text ending in an incomplete character is held back.
"""

from __future__ import annotations

from ember.tokenizer.tokenizer import Tokenizer

CONTEXT_TOKENS = 6  # prompt tokens decoded before the first output token, for its leading space


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids=(), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids)[-CONTEXT_TOKENS:]
        self.prefix = 0
        self.read = len(self.ids)
        self.pieces: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if not after.startswith(before):
            # The prompt ended inside a character (its decode ends in U+FFFD) that the new tokens complete:
            # the completed character is new text, so measure from before the replacement characters.
            before = before.rstrip("\ufffd")
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        delta = after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self.pieces.append(delta)
        return delta
