"""EmbeddingEngine: runs an encoder (embedding model or cross-encoder) over batches of inputs.

No KV cache and no scheduler: each call tokenizes its inputs, sorts them by length (so a batch pads little),
and runs them through the encoder in padded batches of at most MAX_BATCH inputs and MAX_BATCH_TOKENS padded
tokens. It answers the parts of LLMEngine's interface AsyncEngine and the server use (no generation work ever
exists; `validate` refuses generation with a message naming the reason).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ember.encoder_config import EncoderConfig
from ember.engine.engine import EngineArgs, load_named_model
from ember.errors import InvalidParameter
from ember.layers.pooling import finish_embeddings, pool
from ember.loader.model import LoadedModel
from ember.tokenizer.encoder_tokenizer import EncoderInput

MAX_BATCH = 64
MAX_BATCH_TOKENS = 16384


@dataclass
class EncoderResult:
    values: list  # per input: an embedding (list of floats) or a relevance score (float)
    prompt_tokens: int  # tokens the encoder read, [CLS]/[SEP] included


class EmbeddingEngine:
    is_encoder = True

    def __init__(self, model: str | None, args: EngineArgs | None = None, loaded: LoadedModel | None = None):
        # No KV cache: what the server's pool counts for this model is its weights alone.
        self.args = replace(args or EngineArgs(), kv_memory=0)
        if self.args.threads is not None:
            torch.set_num_threads(self.args.threads)
        self.loaded = loaded or load_named_model(model, self.args)
        if not self.loaded.is_encoder:
            raise InvalidParameter("model", f"{self.loaded.name} is not an encoder model")
        self.config: EncoderConfig = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.encoder_tokenizer = self.loaded.encoder_tokenizer
        self.model_name = self.loaded.name
        self.device = self.loaded.device
        self.max_model_len = self.config.max_seq_length
        self.requests: dict = {}
        self.prompt_tokens_total = 0
        self.encoder_calls = 0  # embed_many calls: each runs all the inputs it was given as one set of batches

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def kind(self) -> str:
        return "reranking" if self.config.is_cross_encoder else "embedding"

    # --- what the batching engine's callers expect ----------------------------------------------------------
    def validate(self, prompt_token_ids, params) -> None:
        raise InvalidParameter("model", f"{self.model_name} is an {self.kind} model: it cannot generate text "
                                        f"(use {'/v1/rerank' if self.config.is_cross_encoder else '/v1/embeddings'})")

    def add_request(self, request_id: str, prompt_token_ids, params) -> None:
        self.validate(prompt_token_ids, params)

    def has_work(self) -> bool:
        return False

    def step(self) -> list:
        return []

    def abort(self, request_id: str) -> None:
        return None

    def stats(self) -> dict:
        return {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_total": 0, "prefix_hit_tokens": 0,
                "prefix_miss_tokens": 0, "prompt_tokens_total": self.prompt_tokens_total,
                "generation_tokens_total": 0, "preemptions": 0}

    # --- embeddings and scores ------------------------------------------------------------------------------
    def embed_texts(self, texts: list[str], dimensions: int | None = None, truncate: bool = True) -> EncoderResult:
        return self.embed_inputs(self.text_inputs(texts, truncate), dimensions)

    def embed_token_ids(self, inputs: list[list[int]], dimensions: int | None = None) -> EncoderResult:
        return self.embed_inputs(self.token_id_inputs(inputs), dimensions)

    def text_inputs(self, texts: list[str], truncate: bool = True) -> list[EncoderInput]:
        """Texts tokenized and truncated as sentence-transformers does."""
        return self._tokenized(self.encoder_tokenizer.encode(texts), truncate)

    def token_id_inputs(self, inputs: list[list[int]]) -> list[EncoderInput]:
        """Inputs given as token ids: taken as the whole sequence ([CLS]/[SEP] are the caller's)."""
        for ids in inputs:
            self._check_ids(ids)
        return [EncoderInput(list(ids), [0] * len(ids)) for ids in inputs]

    def embed_inputs(self, inputs: list[EncoderInput], dimensions: int | None = None) -> EncoderResult:
        return self.embed_many([(inputs, dimensions)])[0]

    def check_dimensions(self, dimensions: int | None) -> None:
        self._require("embedding")
        if dimensions is not None and not 0 < dimensions <= self.config.hidden_size:
            raise InvalidParameter("dimensions", f"must be between 1 and {self.config.hidden_size} for this model")

    def embed_many(self, requests: list[tuple[list[EncoderInput], int | None]]) -> list[EncoderResult]:
        """Several requests' inputs through the encoder together (one sort by length, one set of padded
        batches: concurrent small requests fill a batch), each request's vectors finished with its own
        `dimensions`."""
        for _, dimensions in requests:
            self.check_dimensions(dimensions)
        flat = [item for inputs, _ in requests for item in inputs]
        vectors = self._run(flat, lambda hidden, mask: pool(hidden, mask, self.config.pooling))
        self.encoder_calls += 1
        results, at = [], 0
        for inputs, dimensions in requests:
            part = vectors[at:at + len(inputs)]
            at += len(inputs)
            if part.numel():
                part = finish_embeddings(part, self.config.normalize, dimensions)
            results.append(EncoderResult(part.tolist(), self._count(inputs)))
        return results

    def score_pairs(self, pairs: list[tuple[str, str]], truncate: bool = True) -> EncoderResult:
        """A cross-encoder's relevance of each (query, document) pair: sigmoid of its logit, as
        sentence-transformers' CrossEncoder (and vLLM) report a one-label model's score."""
        self._require("reranking")
        inputs = self._tokenized(self.encoder_tokenizer.encode_pairs(pairs), truncate)
        logits = self._run(inputs, lambda hidden, mask: self.loaded.model.score(hidden))
        return EncoderResult(torch.sigmoid(logits[:, 0]).tolist() if logits.numel() else [], self._count(inputs))

    def embed(self, prompt_token_ids: list[int]) -> list[float]:
        """One embedding of token ids (LLMEngine's signature)."""
        return self.embed_token_ids([prompt_token_ids]).values[0]

    def _require(self, kind: str) -> None:
        if self.kind != kind:
            wanted = "an embedding model" if kind == "embedding" else "a reranking (cross-encoder) model"
            raise InvalidParameter("model", f"{self.model_name} is a {self.kind} model; this needs {wanted}")

    def _tokenized(self, inputs: list[EncoderInput], truncate: bool) -> list[EncoderInput]:
        if not truncate:
            # The tokenizer already cut them: an input that fills the limit may have been longer.
            limit = self.max_model_len
            if any(len(i.ids) >= limit for i in inputs):
                raise InvalidParameter("input", f"an input reaches the model's limit of {limit} tokens and "
                                                "truncation is off")
        return inputs

    def _check_ids(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidParameter("input", "an input is empty")
        if len(ids) > self.max_model_len:
            raise InvalidParameter("input", f"an input has {len(ids)} tokens; this model reads at most "
                                            f"{self.max_model_len}")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise InvalidParameter("input", f"token ids must be integers in [0, {self.vocab_size})")

    def _count(self, inputs: list[EncoderInput]) -> int:
        count = sum(len(i.ids) for i in inputs)
        self.prompt_tokens_total += count
        return count

    @torch.inference_mode()
    def _run(self, inputs: list[EncoderInput], head) -> torch.Tensor:
        """head(hidden [B, L, H], mask [B, L]) -> [B, D] for every input, in input order, float32."""
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i].ids), reverse=True)
        results: list[torch.Tensor | None] = [None] * len(inputs)
        start = 0
        while start < len(order):
            width = len(inputs[order[start]].ids)  # the longest of this batch: sorted, the first
            size = max(1, min(MAX_BATCH, MAX_BATCH_TOKENS // max(width, 1)))
            batch = order[start:start + size]
            out = head(*self._forward([inputs[i] for i in batch], width))
            for row, index in enumerate(batch):
                results[index] = out[row]
            start += size
        if not results:
            return torch.empty(0)
        return torch.stack(results).float().cpu()

    def _forward(self, batch: list[EncoderInput], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.tokenizer.pad_token_id or 0
        # Built as Python lists and converted once: a copy per row costs more than the rows themselves.
        ids = torch.tensor([item.ids + [pad] * (width - len(item.ids)) for item in batch])
        types = torch.tensor([item.type_ids + [0] * (width - len(item.ids)) for item in batch])
        lengths = torch.tensor([len(item.ids) for item in batch])
        mask = torch.arange(width)[None, :] < lengths[:, None]
        types.clamp_(max=self.config.type_vocab_size - 1)  # one-type models (RoBERTa) read every segment as 0
        ids, types, mask = ids.to(self.device), types.to(self.device), mask.to(self.device)
        return self.loaded.model(ids, types, mask), mask
