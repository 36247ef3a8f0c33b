"""Constrained decoding: a StructuredOutput compiled into an xgrammar grammar for one tokenizer, and the
per-sequence matcher that turns it into a token mask at each step.

Compiling is the slow part (a large schema takes tens of milliseconds), so the server compiles before it
queues a request (`Grammars.compile` on a worker thread) and the engine's step only fills and applies
masks: `GrammarState.fill` for each constrained row, then `apply_masks`. Compiled grammars are kept in a
bounded LRU cache per tokenizer, keyed by (kind, spec).

JSON is generated without free whitespace (xgrammar's any_whitespace=False: one space after ':' and ','),
so a model that likes whitespace cannot fill max_tokens with it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict

import torch
import xgrammar as xgr

from ember.errors import InvalidParameter
from ember.sampling_params import StructuredOutput
from ember.tokenizer.tokenizer import Tokenizer

log = logging.getLogger("ember.engine")

CACHE_SIZE = 64  # compiled grammars kept per tokenizer
MAX_CHOICES = 1024


def tokenizer_info(tokenizer: Tokenizer, vocab_size: int, stop_token_ids: set[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary: every token's piece as stored (`<0x0A>`, `▁the`, `Ġthe`), with the
    encoding read from the tokenizer's decoder (byte fallback, byte level or raw). Special tokens get an
    empty piece, which xgrammar never allows: their text (`</s>`, `<|im_end|>`) is not output text and
    would otherwise fit inside any JSON string. The stop tokens are the only specials a grammar may end on."""
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.hf.to_str())
    pieces = ["" if i in tokenizer.special_ids else tokenizer.hf.id_to_token(i) or ""
              for i in range(min(vocab_size, tokenizer.vocab_size))]
    stops = sorted(t for t in stop_token_ids if t < vocab_size)
    return xgr.TokenizerInfo(pieces, metadata["vocab_type"], vocab_size=vocab_size, stop_token_ids=stops or None,
                             add_prefix_space=metadata["add_prefix_space"])


def choice_grammar(spec: str) -> str:
    """An EBNF grammar matching exactly one of the strings of a JSON list."""
    choices = json.loads(spec)
    if (not isinstance(choices, list) or not choices or len(choices) > MAX_CHOICES
            or not all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"must be a list of 1 to {MAX_CHOICES} non-empty strings")
    # JSON string escapes (\" \\ \n \t) are also EBNF string escapes.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """Compiles StructuredOutputs for one tokenizer and logits width; safe to call from several threads."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: set[int],
                 cache_size: int = CACHE_SIZE):
        self.vocab_size = vocab_size
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        # Bytes of each token, to find a constraint's `after` marker in the generated text.
        self.token_bytes: list[bytes] = self.info.decoded_vocab
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str | None], xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, structured: StructuredOutput, field: str = "structured") -> xgr.CompiledGrammar:
        """The compiled grammar of `structured`; an invalid spec raises InvalidParameter naming `field`."""
        key = (structured.kind, structured.spec)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        try:
            compiled = self._compile(structured)
        except (RuntimeError, ValueError, TypeError) as err:  # xgrammar reports bad specs as RuntimeError
            detail = str(err).strip().splitlines()
            # Drop xgrammar's "[time] file.cc:line:" prefix; keep its explanation.
            message = detail[0].split(": ", 1)[-1] if detail else "invalid"
            raise InvalidParameter(field, f"invalid {structured.kind.replace('_', ' ')}: {message[:300]}") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, structured: StructuredOutput) -> xgr.CompiledGrammar:
        kind, spec = structured.kind, structured.spec
        if kind == "json_object":
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "json_schema":
            return self.compiler.compile_json_schema(spec, any_whitespace=False)
        if kind == "regex":
            return self.compiler.compile_regex(spec)
        if kind == "choice":
            return self.compiler.compile_grammar(choice_grammar(spec))
        if kind == "grammar":
            return self.compiler.compile_grammar(spec)
        return self.compiler.compile_structural_tag(spec)

    def state(self, structured: StructuredOutput) -> GrammarState:
        """A fresh matcher for one sequence (one choice of a request)."""
        return GrammarState(xgr.GrammarMatcher(self.compile(structured)), structured.after, self.token_bytes)


class GrammarState:
    """One sequence's position in its grammar. Before the `after` marker has been generated the sequence is
    free (`active` is False); the text that follows the marker, within the marker's own token included, is
    matched. The state only moves forward with accepted output tokens, so it survives preemption (which
    recomputes the KV cache from the same tokens) unchanged."""

    def __init__(self, matcher: xgr.GrammarMatcher, after: str | None, token_bytes: list[bytes]):
        self.matcher = matcher
        self.marker = after.encode() if after else None
        self.token_bytes = token_bytes
        self.seen = b""  # the generated bytes' tail that may hold the start of the marker
        self.violated = False  # the text after the marker, within its token, broke the grammar

    @property
    def active(self) -> bool:
        return self.marker is None

    @property
    def finished(self) -> bool:
        """The grammar is done (its stop token accepted), or it can no longer be satisfied."""
        return self.violated or self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False if the grammar rejects it (the sequence must end)."""
        if self.active:
            accepted = self.matcher.accept_token(token)
            self.violated = not accepted
            return accepted
        self.seen += self.token_bytes[token] if token < len(self.token_bytes) else b""
        found = self.seen.find(self.marker)
        if found < 0:
            self.seen = self.seen[-(len(self.marker) - 1):] if len(self.marker) > 1 else b""
            return True
        rest = self.seen[found + len(self.marker):]
        self.marker, self.seen = None, b""
        if rest and not self.matcher.accept_string(rest):
            log.warning("constrained text after the 'after' marker was rejected by the grammar; ending the sequence")
            self.violated = True
            return False
        return True


def fill_masks(states: list[GrammarState | None], vocab_size: int) -> tuple[torch.Tensor, list[int]] | None:
    """One bitmask row per sequence, filled for the rows whose constraint is active; None if none is."""
    rows = [row for row, state in enumerate(states) if state is not None and state.active]
    if not rows:
        return None
    bitmask = xgr.allocate_token_bitmask(len(states), vocab_size)
    for row in rows:
        states[row].fill(bitmask, row)
    return bitmask, rows


def apply_masks(logits: torch.Tensor, masks: tuple[torch.Tensor, list[int]]) -> None:
    """Set the logits the grammar forbids to -inf, in place, on the constrained rows only."""
    bitmask, rows = masks
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
