"""A request's state inside the engine: its tokens, its KV blocks and how far it has been computed."""

from __future__ import annotations

import enum
import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.sampling_params import SamplingParams

_arrival = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.arrival = next(_arrival)
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at admission
        self.finish_reason: str | None = None
        self.lora_slot = 0  # the LoRA adapter's slot in the model's low-rank paths (ember.layers.lora); 0: none
        self.cache_salt = b""  # keeps its prefix-cache keys apart from other adapters' (the adapter's id)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params is not None and self.params.prompt_logprobs is not None

    @property
    def reuses_prefix_cache(self) -> bool:
        """Whether cached blocks may stand in for its prompt: not when every position's logits are needed."""
        return self.params is None or (self.params.use_prefix_cache and self.params.prompt_logprobs is None)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
