"""Workloads for `ember bench serve`: random prompts of chosen token lengths, or ShareGPT conversations.

Prompt lengths are made exact with the server's own tokenizer (its `/tokenize` endpoint, llama.cpp or
vLLM style) when it has one; otherwise one common English word is counted as one token, which is
close for modern BPE vocabularies. The workload is built once and replayed unchanged against every
server compared, so they all answer the very same prompts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from ember.errors import EmberError

# Short, frequent words: nearly every one is a single token (with its leading space) in Llama, Qwen,
# Mistral and GPT vocabularies, which keeps approximate lengths close and exact fitting quick.
WORDS = (
    "the of and to in is was for on that with as by at from his her this which or had not are but have "
    "they one all were we when there can an your been has more if will would who so some out up into time "
    "them only new than about other then like these may its our over could two also first after well year "
    "work way even back good any just where most people through much before great old same right because "
    "long little world still own found made between never life city under last while state day house "
    "water small place part system number group line point home school light night power music river "
    "story field market table paper garden window letter summer winter morning evening country island"
).split()
MAX_FIT_ROUNDS = 6  # words tokenizing to several tokens can make an exact length unreachable; stop close


class DatasetError(EmberError):
    """A benchmark dataset is missing, malformed or too small."""


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int  # tokens, exact when `exact_lengths` of the workload is true
    output_len: int  # max_tokens asked of the server


@dataclass
class Workload:
    requests: list[BenchRequest]
    exact_lengths: bool  # prompt lengths counted by the server's tokenizer


Tokenize = Callable[[str], int]  # text -> token count


class ServerTokenizer:
    """Counts tokens with a server's /tokenize: llama.cpp and ember take {"content"}, vLLM {"model", "prompt"}."""

    STYLES = (("content", {}), ("prompt", {"add_special_tokens": False}))

    def __init__(self, base_url: str, model: str, timeout: float = 10.0):
        self.client = httpx.Client(base_url=base_url, timeout=timeout)
        self.model = model
        self.style: tuple[str, dict] | None = None
        for text_key, extra in self.STYLES:
            try:
                self.style = (text_key, extra)
                if self("hello world") > 0:
                    return
            except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
                pass
        self.style = None

    @property
    def available(self) -> bool:
        return self.style is not None

    def __call__(self, text: str) -> int:
        text_key, extra = self.style
        response = self.client.post("/tokenize", json={text_key: text, "model": self.model, **extra})
        response.raise_for_status()
        tokens = response.json()["tokens"]
        if not isinstance(tokens, list):
            raise ValueError("/tokenize answered without a token list")
        return len(tokens)

    def close(self) -> None:
        self.client.close()


def _lengths(rng: random.Random, n: int, mean: int, ratio: float) -> list[int]:
    low, high = max(1, round(mean * (1 - ratio))), max(1, round(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(n)]


def _fit_prompt(rng: random.Random, length: int, count: Tokenize | None) -> tuple[str, int]:
    """Random words adjusted until the tokenizer counts `length` tokens (or as close as it gets)."""
    words = [rng.choice(WORDS) for _ in range(length)]
    if count is None:
        return " ".join(words), length
    best: tuple[str, int] | None = None
    for _ in range(MAX_FIT_ROUNDS):
        text = " ".join(words)
        tokens = count(text)
        if best is None or abs(tokens - length) < abs(best[1] - length):
            best = (text, tokens)
        if tokens == length:
            break
        if tokens > length:
            words = words[: max(1, len(words) - (tokens - length))]
        else:
            words += [rng.choice(WORDS) for _ in range(length - tokens)]
    return best


def random_workload(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    count: Tokenize | None, seed: int = 0) -> Workload:
    if not 0 <= range_ratio < 1:
        raise DatasetError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise DatasetError("--random-input-len and --random-output-len must be positive")
    rng = random.Random(seed)
    inputs = _lengths(rng, num_prompts, input_len, range_ratio)
    outputs = _lengths(rng, num_prompts, output_len, range_ratio)
    requests = []
    for wanted, out in zip(inputs, outputs, strict=True):
        text, tokens = _fit_prompt(rng, wanted, count)
        requests.append(BenchRequest(text, tokens, out))
    return Workload(requests, exact_lengths=count is not None)


def _sharegpt_pairs(path: Path) -> list[tuple[str, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not a readable ShareGPT JSON file ({err})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, reply = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(reply, dict)):
            continue
        prompt, answer = first.get("value"), reply.get("value")
        if isinstance(prompt, str) and isinstance(answer, str) and prompt and answer:
            pairs.append((prompt, answer))
    return pairs


def _approx_tokens(text: str) -> int:
    return max(1, round(len(text) / 4))  # English averages about four characters per token


def sharegpt_workload(path: Path, num_prompts: int, count: Tokenize | None, output_len: int | None = None,
                      seed: int = 0, max_prompt_len: int = 1024, max_total_len: int = 2048) -> Workload:
    """First human turn as the prompt, the first reply's length as max_tokens (or `output_len`).

    Conversations too short to time (under 4 tokens either way) or too long for small contexts are
    skipped, as vLLM's benchmark does, so results stay comparable with its figures.
    """
    pairs = _sharegpt_pairs(Path(path))
    random.Random(seed).shuffle(pairs)
    measure = count or _approx_tokens
    requests = []
    for prompt, answer in pairs:
        if len(requests) == num_prompts:
            break
        prompt_len = measure(prompt)
        out = output_len or measure(answer)
        if prompt_len < 4 or out < 4 or prompt_len > max_prompt_len or prompt_len + out > max_total_len:
            continue
        requests.append(BenchRequest(prompt, prompt_len, out))
    if not requests:
        raise DatasetError(f"{path}: no usable conversations (need a first turn and a reply of 4+ tokens)")
    return Workload(requests, exact_lengths=count is not None)
