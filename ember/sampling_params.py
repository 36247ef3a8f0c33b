"""SamplingParams: how one request wants its tokens chosen and when it wants generation to stop.

Everything a client can send is checked here, once, so the sampler and the stop checker can trust it.
Token ids are the exception: their range depends on the model, so the engine calls `check_vocab`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ember.errors import InvalidParameter

MAX_N = 16
MAX_TOKENS_LIMIT = 1_000_000
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 1024
LOGIT_BIAS_LIMIT = 100.0
SEED_LIMIT = 2**63


def _is_int(value) -> bool:
    # bool is a subclass of int, but `n=True` is a client bug, not a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _int(name: str, value, low: int, high: int) -> int:
    if not _is_int(value):
        raise InvalidParameter(name, f"must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise InvalidParameter(name, f"must be in [{low}, {high}], got {value}")
    return value


def _float(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(name, f"must be a number in {bounds}, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidParameter(name, f"must be a finite number in {bounds}, got {value}")
    if value > high or value < low or (low_open and value == low):
        raise InvalidParameter(name, f"must be in {bounds}, got {value:g}")
    return value


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InvalidParameter(name, f"must be true or false, got {value!r}")
    return value


def _stop_strings(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise InvalidParameter("stop", f"must be a string or a list of strings, got {type(value).__name__}")
    if len(value) > MAX_STOP_STRINGS:
        raise InvalidParameter("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
    for text in value:
        if not isinstance(text, str) or not text:
            raise InvalidParameter("stop", f"each stop string must be a non-empty string, got {text!r}")
        if len(text) > MAX_STOP_STRING_CHARS:
            raise InvalidParameter("stop", f"each stop string must be at most {MAX_STOP_STRING_CHARS} characters")
    return list(value)


def _stop_token_ids(value) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise InvalidParameter("stop_token_ids", "must be a list of token ids")
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise InvalidParameter("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(value)}")
    for token in value:
        if not _is_int(token) or token < 0:
            raise InvalidParameter("stop_token_ids", f"each id must be an integer >= 0, got {token!r}")
    return list(value)


def _token_key(key) -> int | None:
    """A logit_bias key as a token id; OpenAI clients send them as JSON object keys, i.e. strings."""
    if _is_int(key):
        return key
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    return None


def _logit_bias(value) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidParameter("logit_bias", "must be an object mapping token ids to biases")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidParameter("logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(value)}")
    bias: dict[int, float] = {}
    for key, amount in value.items():
        token = _token_key(key)
        if token is None or token < 0:
            raise InvalidParameter("logit_bias", f"keys must be token ids (integers >= 0), got {key!r}")
        bias[token] = _float(f"logit_bias[{token}]", amount, -LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT)
    return bias


STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar", "structural_tag")
MAX_STRUCTURED_SPEC_CHARS = 1_000_000


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint the generated text must satisfy, enforced token by token with a grammar mask.

    kind / spec: "json_object" (any JSON object; spec None), "json_schema" (spec: the schema as JSON text),
    "regex" (spec: the pattern), "choice" (spec: a JSON list of the allowed strings), "grammar" (spec: GBNF
    or EBNF text), "structural_tag" (spec: xgrammar's structural-tag JSON, for tool calls).
    `after`: the constraint starts only once this text has been generated (the end of a model's reasoning,
    e.g. "</think>"); until then the sequence is free.
    """

    kind: str
    spec: str | None = None
    after: str | None = None

    def __post_init__(self):
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidParameter("structured", f"kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}")
        if (self.spec is None) != (self.kind == "json_object"):
            raise InvalidParameter("structured", f"a {self.kind} constraint {'takes no' if self.kind == 'json_object' else 'needs a'} spec")
        if self.spec is not None and (not isinstance(self.spec, str) or len(self.spec) > MAX_STRUCTURED_SPEC_CHARS):
            raise InvalidParameter("structured", f"spec must be text of at most {MAX_STRUCTURED_SPEC_CHARS} characters")
        if self.after is not None and (not isinstance(self.after, str) or not self.after):
            raise InvalidParameter("structured", "after must be a non-empty string")


@dataclass(kw_only=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 256  # None: until the context is full; 0: evaluate the prompt only
    min_tokens: int = 0  # EOS and stop ids/strings are ignored until this many tokens exist
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_window: int | None = None  # the penalty looks at the last this-many tokens; None: all of them
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token plus the k most likely alternatives
    # Log-probabilities of the prompt's own tokens (each given those before it), with k alternatives each:
    # what evaluation harnesses score. Such a request bypasses the prefix cache, whose hits skip positions.
    prompt_logprobs: int | None = None
    use_prefix_cache: bool = True  # False: compute the whole prompt even where cached blocks hold it
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured: StructuredOutput | None = None  # constrained decoding (ember.engine.structured)
    speculative: bool = True  # False: never draft tokens for this request (when the engine speculates)
    lora: str | None = None  # the name of a loaded LoRA adapter to generate with (docs/lora.md); None: the base

    def __post_init__(self):
        self.n = _int("n", self.n, 1, MAX_N)
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens, 0, MAX_TOKENS_LIMIT)
        self.min_tokens = _int("min_tokens", self.min_tokens, 0,
                               MAX_TOKENS_LIMIT if self.max_tokens is None else self.max_tokens)
        self.temperature = _float("temperature", self.temperature, 0.0, 2.0)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise InvalidParameter("top_k", f"must be an integer >= 1, or 0 or -1 to disable, got {self.top_k!r}")
        self.top_p = _float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self.min_p = _float("min_p", self.min_p, 0.0, 1.0)
        self.repetition_penalty = _float("repetition_penalty", self.repetition_penalty, 0.0, 10.0, low_open=True)
        if self.repetition_window is not None:
            self.repetition_window = _int("repetition_window", self.repetition_window, 1, MAX_TOKENS_LIMIT)
        self.presence_penalty = _float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            self.seed = _int("seed", self.seed, 0, SEED_LIMIT - 1)
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _stop_token_ids(self.stop_token_ids)
        self.ignore_eos = _bool("ignore_eos", self.ignore_eos)
        if self.logprobs is not None:
            self.logprobs = _int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        self.logit_bias = _logit_bias(self.logit_bias)
        self.skip_special_tokens = _bool("skip_special_tokens", self.skip_special_tokens)
        self.include_stop_str_in_output = _bool("include_stop_str_in_output", self.include_stop_str_in_output)
        self.speculative = _bool("speculative", self.speculative)
        self.use_prefix_cache = _bool("use_prefix_cache", self.use_prefix_cache)
        if self.lora is not None and not isinstance(self.lora, str):
            raise InvalidParameter("lora", f"must be an adapter name, got {self.lora!r}")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise InvalidParameter("structured", f"must be a StructuredOutput, got {type(self.structured).__name__}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Reject token ids the model cannot produce; the engine calls this once it knows the model."""
        for token in self.stop_token_ids:
            if token >= vocab_size:
                raise InvalidParameter("stop_token_ids", f"id {token} is outside the vocabulary [0, {vocab_size})")
        for token in self.logit_bias:
            if token >= vocab_size:
                raise InvalidParameter("logit_bias", f"token id {token} is outside the vocabulary [0, {vocab_size})")
