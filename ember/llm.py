"""LLM: the offline Python API. `generate` runs every prompt through the batching engine at once."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import replace

from ember.engine.embedding_engine import EmbeddingEngine
from ember.engine.engine import EngineArgs
from ember.engine.factory import create_engine
from ember.engine.lora_spec import LoraSpec
from ember.engine.outputs import CompletionOutput
from ember.errors import ChatTemplateError, InvalidParameter
from ember.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """`LLM(model)` with a GGUF file, a transformers folder, or None for the bundled default model.

    An encoder (BERT-family embedding model or cross-encoder) gets the embedding engine: `embed` and `score`
    work, generation raises InvalidParameter."""

    def __init__(self, model: str | None = None, **engine_args):
        self.engine = create_engine(model, EngineArgs(**engine_args))
        self.tokenizer = self.engine.tokenizer
        self.chat_template = self.engine.loaded.chat_template
        self._ids = itertools.count()

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise InvalidParameter("prompt", "expected a string or a list of token ids")

    def generate(
        self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False, lora: str | None = None,
    ) -> list[CompletionOutput]:
        """One output per prompt and per sample (`params.n`), in prompt order; `params`: one for all prompts or
        one per prompt; `lora`: a loaded adapter's name for every prompt (else each params' own `lora`);
        `use_tqdm`: a progress bar of the finished sequences on stderr."""
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)
        )
        prompt_list = [prompts] if single else list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(prompt_list)
        else:
            params_list = list(params)
            if len(params_list) != len(prompt_list):
                raise InvalidParameter("params", f"{len(params_list)} SamplingParams for {len(prompt_list)} prompts")
        if lora is not None:
            params_list = [replace(p, lora=lora) for p in params_list]
        order: list[str] = []
        prompt_ids: dict[str, list[int]] = {}
        for prompt, params in zip(prompt_list, params_list, strict=True):
            ids = self.encode(prompt)
            for sample in range(params.n):
                seed = None if params.seed is None else params.seed + sample
                request_id = f"gen-{next(self._ids)}"
                self.engine.add_request(request_id, ids, replace(params, n=1, seed=seed))
                order.append(request_id)
                prompt_ids[request_id] = ids
        results = self._run(order, use_tqdm)
        for request_id, out in results.items():
            out.prompt_token_ids = prompt_ids[request_id]
        return [results[r] for r in order]

    def _run(self, request_ids: list[str], use_tqdm: bool = False) -> dict[str, CompletionOutput]:
        from tqdm import tqdm

        pieces: dict[str, CompletionOutput] = {}
        pending = set(request_ids)
        with tqdm(total=len(request_ids), desc="Processed prompts", unit="seq", disable=not use_tqdm) as bar:
            self._step_until_done(pieces, pending, bar)
        return pieces

    def _step_until_done(self, pieces: dict[str, CompletionOutput], pending: set[str], bar) -> None:
        while pending:
            for out in self.engine.step():
                done = pieces.setdefault(out.request_id, CompletionOutput(
                    out.request_id, [], "", [], "", [] if out.logprobs is not None else None))
                done.text += out.text_delta
                done.token_ids.extend(out.token_ids)
                if out.logprobs is not None:
                    done.logprobs = (done.logprobs or []) + out.logprobs
                if out.prompt_logprobs is not None:
                    done.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    done.finish_reason = out.finish_reason
                    done.cached_tokens = out.cached_tokens
                    pending.discard(out.request_id)
                    bar.update(1)

    def load_lora(self, name: str, path: str, scale: float = 1.0) -> None:
        """Load a LoRA adapter (a PEFT folder or a GGUF LoRA file) that requests then name (docs/lora.md)."""
        self.engine.load_lora(LoraSpec(name, str(path), scale))

    def unload_lora(self, name: str) -> None:
        self.engine.unload_lora(name)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, **template_kwargs) -> str:
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template; use generate() with a plain prompt")
        return self.chat_template.render(messages, tools=tools, add_generation_prompt=True, **template_kwargs)

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             tools: list[dict] | None = None, use_tqdm: bool = False, **template_kwargs) -> list[CompletionOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.encode(self.render_chat(c, tools, **template_kwargs), add_special_tokens=False)
                   for c in conversations]
        return self.generate(prompts, params, use_tqdm)

    def embed(self, texts: str | Seq[str], dimensions: int | None = None) -> list[list[float]]:
        """One embedding per text. An embedding model pools, normalises and truncates as sentence-transformers
        does; a decoder (chat) model gives the mean of its final hidden states (no `dimensions`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if isinstance(self.engine, EmbeddingEngine):
            return self.engine.embed_texts(texts, dimensions).values
        if dimensions is not None:
            raise InvalidParameter("dimensions", "needs an embedding model")
        return [self.engine.embed(self.encode(text)) for text in texts]

    def score(self, query: str, documents: Seq[str]) -> list[float]:
        """A cross-encoder's relevance score (0..1) of each document for the query."""
        if not isinstance(self.engine, EmbeddingEngine):
            raise InvalidParameter("model", "scoring needs a reranking (cross-encoder) model")
        return self.engine.score_pairs([(query, doc) for doc in documents]).values
