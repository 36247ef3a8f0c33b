"""What the engine hands back to its callers (LLM, server): plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass

from ember.layers.sampler import TokenLogprob


@dataclass
class StepOutput:
    """One increment of a streaming request: what is new since the previous increment."""

    request_id: str
    text_delta: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class CompletionOutput:
    """A finished generation, as `LLM.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    cached_tokens: int = 0
