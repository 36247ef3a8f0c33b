"""LLMEngine: the synchronous core that turns requests into scheduled steps and streamed outputs.

One `step()` = schedule (decodes first, then prefill chunks) -> one batched forward -> per-sequence
sampling -> detokenize -> stop checks. `LLM` drives it directly; `AsyncEngine` drives it from a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch

from ember.engine.block_manager import BlockManager
from ember.engine.lora import LoraRegistry
from ember.engine.lora_spec import LoraSpec, lora_specs
from ember.engine.model_runner import ModelRunner, PromptScores
from ember.engine.outputs import StepOutput, TokenLogprob
from ember.engine.scheduler import ScheduledChunk, Scheduler
from ember.engine.sequence import Sequence, SequenceStatus
from ember.engine.speculator import Candidate, Speculator
from ember.engine.stop import StopChecker
from ember.errors import InvalidParameter, OutOfResources
from ember.layers.sampler import Sampler, SamplingState, token_logprobs
from ember.loader.dtypes import DTYPE_ALIASES, DTYPE_BYTES
from ember.loader.lora import LoraWeights
from ember.loader.model import LoadedModel, load_model
from ember.sampling_params import SamplingParams
from ember.store.memory import KV_CACHE_DTYPES, kv_bytes_per_token
from ember.store.resolve import resolve
from ember.tokenizer.detokenizer import IncrementalDetokenizer

log = logging.getLogger("ember.engine")

DEFAULT_MAX_MODEL_LEN = 8192
MAX_SPEC_TOKENS = 16


@dataclass
class EngineArgs:
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None  # default: the model's context, capped at 8192 unless asked
    # Bytes for the KV cache; default: max_num_seqs full contexts, within a share of the free memory.
    kv_memory: int | None = None
    # "auto": K/V cached in the activation dtype; "int8": int8 values and a scale per token and KV head
    # (docs/kv-cache.md), half the bytes of a 16-bit cache, so kv_memory holds twice the tokens.
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 32
    max_batched_tokens: int = 512
    threads: int | None = None  # torch's CPU threads, process-wide; default: torch's (the physical cores)
    # Speculative decoding (docs/speculative.md): a draft model sharing the target's vocabulary, or n-gram
    # lookup in the sequence itself (the longest match of its last spec_ngram tokens); spec_tokens drafts.
    draft: str | None = None
    spec_ngram: int | None = None
    spec_tokens: int = 4
    # LoRA adapters loaded at start (docs/lora.md): "name=path", "name=path:scale", a bare path (named after its
    # file) or LoraSpec objects; requests pick one by name (SamplingParams.lora).
    lora: list | str | None = None
    # The dtype adapters are held in: "auto" (bfloat16 for float32 activations on a CPU with AVX512-BF16, else the
    # activation dtype: ember.loader.dtypes.resolve_lora_dtype_name), float32, bfloat16 or float16.
    lora_dtype: str = "auto"

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidParameter(name, "must be a positive integer")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise InvalidParameter("kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}, "
                                                     f"got {self.kv_cache_dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidParameter("max_model_len", "must be at least 2")
        if self.spec_ngram is not None and (not isinstance(self.spec_ngram, int) or self.spec_ngram < 1):
            raise InvalidParameter("spec_ngram", f"must be a positive integer, got {self.spec_ngram!r}")
        if not isinstance(self.spec_tokens, int) or not 1 <= self.spec_tokens <= MAX_SPEC_TOKENS:
            raise InvalidParameter("spec_tokens", f"must be an integer in [1, {MAX_SPEC_TOKENS}], got {self.spec_tokens!r}")
        if self.draft is not None and self.spec_ngram is not None:
            raise InvalidParameter("spec_ngram", "choose one way to draft tokens: a draft model or n-gram lookup")
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 1):
            raise InvalidParameter("threads", f"must be a positive integer, got {self.threads!r}")
        self.lora = lora_specs(self.lora)
        lora_dtype = DTYPE_ALIASES.get(str(self.lora_dtype), str(self.lora_dtype))
        if lora_dtype != "auto" and lora_dtype not in DTYPE_BYTES:
            raise InvalidParameter("lora_dtype", f"must be auto, float32, bfloat16 or float16, got {self.lora_dtype!r}")


@dataclass
class _Request:
    seq: Sequence
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    text: list[str] = field(default_factory=list)
    # Log-probabilities of prompt tokens 1.. (token 0 has none), when the request scores its prompt; handed
    # over once, with the request's first output.
    prompt_logprobs: list[TokenLogprob] | None = None
    prompt_logprobs_sent: bool = False


def _default_kv_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    return int(psutil.virtual_memory().available * 0.2)


def load_named_model(model: str | None, args: EngineArgs) -> LoadedModel:
    """What a model reference (a path, a name, None for the bundled model) names, loaded as `args` ask."""
    resolved = resolve(model, allow_paths=True)
    return load_model(resolved.path, dtype=args.dtype, device=args.device, name=resolved.name)


class LLMEngine:
    def __init__(self, model: str, args: EngineArgs | None = None, loaded: LoadedModel | None = None):
        self.args = args or EngineArgs()
        if self.args.threads is not None:
            # Before loading, so weight repacking uses them too; the native kernels read torch's count as well.
            torch.set_num_threads(self.args.threads)
        self.loaded = loaded or self._load(model)
        if self.loaded.is_encoder:
            raise InvalidParameter("model", f"{self.loaded.name} is an embedding/reranking model: it cannot generate "
                                            "text (serve it and use /v1/embeddings or /v1/rerank)")
        config, self.tokenizer = self.loaded.config, self.loaded.tokenizer
        self.model_name = self.loaded.name
        self.device = self.loaded.device
        limit = config.max_position_embeddings
        self.max_model_len = min(self.args.max_model_len or min(limit, DEFAULT_MAX_MODEL_LEN), limit)
        block_size = self.args.block_size
        per_token = kv_bytes_per_token(config, self.loaded.dtype.itemsize, self.args.kv_cache_dtype)
        if self.args.kv_memory is not None:
            num_blocks = self.args.kv_memory // per_token // block_size
        else:
            # max_num_seqs sequences of the full context each (one for `ember run`), in whole blocks.
            wanted = -(-self.max_model_len // block_size) * self.args.max_num_seqs
            num_blocks = min(wanted, _default_kv_budget(self.device) // per_token // block_size)
        if num_blocks * block_size < self.max_model_len:
            if self.args.kv_memory is not None and num_blocks < 1:
                raise OutOfResources(f"kv_memory {self.args.kv_memory} bytes holds no {block_size}-token block")
            # Shrink the context to what the cache can hold rather than failing on the first long request.
            self.max_model_len = max(num_blocks * block_size, 2)
            log.warning("KV cache holds %d tokens: max_model_len lowered to that", self.max_model_len)
        self.num_blocks = max(num_blocks, 1)
        self.block_manager = BlockManager(self.num_blocks, block_size, salt=self.model_name)
        self.scheduler = Scheduler(self.block_manager, self.args.max_num_seqs, self.args.max_batched_tokens)
        self.clock = time.perf_counter  # times steps for the scheduler's budget; tests substitute a fake
        self.runner = ModelRunner(self.loaded.model, config, self.device, self.loaded.dtype, block_size, self.num_blocks,
                                  self.args.kv_cache_dtype)
        self.sampler = Sampler()
        self.speculator: Speculator | None = None
        if self.args.draft is not None or self.args.spec_ngram is not None:
            draft = None
            if self.args.draft is not None:
                draft = self._load(self.args.draft)
            self.speculator = Speculator(self.args.spec_tokens, self.args.spec_ngram, draft, self.loaded,
                                         self.num_blocks, block_size, self.args.max_batched_tokens,
                                         self.args.max_num_seqs)
        self.lora = LoraRegistry(self.loaded, self.args.lora_dtype)
        for spec in self.args.lora:
            self.add_lora(self.lora.read(spec))
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(config.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self._grammars = None  # ember.engine.structured.Grammars, built for the first constrained request
        self._grammars_lock = threading.Lock()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        log.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.1f MiB), max_model_len %d",
            self.num_blocks, block_size, self.num_blocks * block_size,
            self.num_blocks * block_size * per_token / 2**20, self.max_model_len,
        )

    def _load(self, model: str | None) -> LoadedModel:
        return load_named_model(model, self.args)

    def add_lora(self, weights: LoraWeights) -> None:
        """Register an adapter read by `self.lora.read` (between steps: the engine thread)."""
        self.lora.add(weights)
        self.runner.lora = self.lora.layers

    def load_lora(self, spec: LoraSpec) -> None:
        self.add_lora(self.lora.read(spec))

    def unload_lora(self, name: str) -> None:
        """Drop an adapter no running or waiting request uses (LoraInUse otherwise, LoraNotFound if unknown)."""
        self.lora.unload(name)

    @property
    def vocab_size(self) -> int:
        return self.loaded.config.vocab_size

    @property
    def grammars(self):
        """The grammar compiler for this model's vocabulary (xgrammar is imported on first use)."""
        with self._grammars_lock:
            if self._grammars is None:
                from ember.engine.structured import Grammars

                self._grammars = Grammars(self.tokenizer, self.vocab_size, set(self.eos_token_ids))
            return self._grammars

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Reject what can never run, before it is queued (called from any thread)."""
        if not prompt_token_ids:
            raise InvalidParameter("prompt", "the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            over = len(prompt_token_ids) - self.max_model_len + 1
            raise InvalidParameter(
                "prompt",
                f"the prompt has {len(prompt_token_ids)} tokens, {over} more than the context of "
                f"{self.max_model_len} allows (leaving room for one generated token)",
            )
        vocab = self.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidParameter("prompt", f"token ids must be integers in [0, {vocab})")
        params.check_vocab(vocab)
        if params.lora is not None:
            self.lora.get(params.lora)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise InvalidParameter("request_id", f"{request_id!r} is already running")
        self.validate(prompt_token_ids, params)
        seq = Sequence(request_id, prompt_token_ids, params)
        if params.lora is not None:
            adapter = self.lora.get(params.lora)
            adapter.users.add(request_id)
            seq.lora_slot, seq.cache_salt = adapter.slot, f"lora:{adapter.uid}".encode()
        room = self.max_model_len - len(prompt_token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        sampling = SamplingState(
            params=params, generator=generator, prompt_token_ids=list(prompt_token_ids), output_token_ids=[],
            eos_token_ids=frozenset() if params.ignore_eos else self.eos_token_ids,
            # A cache hit when the server compiled it before queueing the request.
            grammar=self.grammars.state(params.structured) if params.structured is not None else None,
        )
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
        stop = StopChecker(params, self.eos_token_ids, max_tokens)
        self.requests[request_id] = _Request(seq, sampling, detokenizer, stop,
                                             prompt_logprobs=[] if params.prompt_logprobs is not None else None)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> StepOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self._finish(request.seq)
        return self._output(request, request.stop.flush(), [], None, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _output(self, request, text, token_ids, logprobs, finish_reason) -> StepOutput:
        seq = request.seq
        prompt_logprobs = None
        # Complete once a token was sampled or the prompt was evaluated to its end (an abort may come earlier).
        complete = token_ids or (finish_reason is not None and seq.num_computed_tokens >= seq.num_prompt_tokens)
        if request.prompt_logprobs is not None and not request.prompt_logprobs_sent and complete:
            prompt_logprobs = [None, *request.prompt_logprobs]
            request.prompt_logprobs_sent = True
        return StepOutput(
            request_id=seq.request_id, text_delta=text, token_ids=token_ids, logprobs=logprobs,
            finished=finish_reason is not None, finish_reason=finish_reason,
            prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
            cached_tokens=seq.num_cached_tokens, prompt_logprobs=prompt_logprobs,
            stop_reason=request.stop.stopped_by if finish_reason == "stop" else None,
        )

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        started = self.clock()
        if self.speculator is not None:
            self._speculate(chunks)
        sampled, logits, scored = self.runner.run(chunks)
        for scores in scored:
            self._score_prompt(self.requests[scores.seq.request_id], scores)
        for chunk in chunks:
            if chunk.proposal is not None:
                continue  # what it computed for good is known once its drafts are verified
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.register_computed(chunk.seq)
            if chunk.seq.num_output_tokens == 0:
                self.prompt_tokens_total += chunk.num_tokens
        if not sampled:
            # Not timed: nothing here waits for the device (CUDA and MPS run asynchronously).
            return []
        plain_rows, plain, verified, outputs, row = [], [], [], [], 0
        for chunk in sampled:
            request = self.requests[chunk.seq.request_id]
            if request.stop.max_tokens == 0:  # the prompt is evaluated (and scored), nothing is generated
                outputs.append(self._finish_unsampled(request, "length"))
            elif chunk.proposal is None:
                plain_rows.append(row)
                plain.append(request)
            else:
                verified.append((chunk, logits[row : row + chunk.num_logits]))
            row += chunk.num_logits
        if plain:
            rows = logits if len(plain_rows) == logits.shape[0] else logits[plain_rows]
            tokens, logprobs = self.sampler(rows, [r.sampling for r in plain])
            outputs += [self._advance(r, [t], [lp] if lp else None)
                        for r, t, lp in zip(plain, tokens, logprobs, strict=True)]
        if verified:
            outputs += self._verify(verified)
        # The whole step, as the streams see it between two tokens.
        self.scheduler.observe_step(self.clock() - started)
        return outputs

    def _speculate(self, chunks: list[ScheduledChunk]) -> None:
        """Give the step's decodes drafted tokens to verify, within the step's spare token budget."""
        budget = self.args.max_batched_tokens - sum(c.num_tokens for c in chunks)
        candidates = []
        for chunk in chunks:
            seq = chunk.seq
            if chunk.num_tokens != 1 or not chunk.samples or seq.num_output_tokens == 0 or budget <= 0:
                continue
            request = self.requests[seq.request_id]
            params = request.sampling.params
            # Structured-output masks are not applied to drafted positions: such requests decode plainly.
            if not params.speculative or params.structured is not None:
                continue
            room = min(request.stop.max_tokens - request.stop.num_tokens - 1, budget)
            if room > 0:
                candidates.append(Candidate(chunk, request.sampling, room))
                budget -= min(room, self.args.spec_tokens)
        self.speculator.propose(candidates, self.block_manager)

    def _verify(self, verified: list[tuple[ScheduledChunk, torch.Tensor]]) -> list[StepOutput]:
        requests = [self.requests[chunk.seq.request_id] for chunk, _ in verified]
        results = self.speculator.verify(
            [(chunk, rows, request.sampling) for (chunk, rows), request in zip(verified, requests, strict=True)])
        outputs = []
        for (chunk, _), request, (tokens, logprobs) in zip(verified, requests, results, strict=True):
            seq = chunk.seq
            # K/V is kept for the sequence's last token and the accepted drafts; the rejected drafts' is
            # dropped, with the blocks only they filled.
            seq.num_computed_tokens += len(tokens)
            self.block_manager.truncate(seq, seq.num_computed_tokens)
            output = self._advance(request, tokens, logprobs)
            if not output.finished:
                self.block_manager.register_computed(seq)
            outputs.append(output)
        return outputs

    def _advance(self, request: _Request, tokens: list[int], logprobs: list[TokenLogprob] | None) -> StepOutput:
        """Append the step's tokens to the sequence until one of them finishes it."""
        seq = request.seq
        texts, reason, count = [], None, 0
        grammar = request.sampling.grammar
        for token in tokens:
            seq.token_ids.append(token)
            request.sampling.output_token_ids.append(token)
            self.generation_tokens_total += 1
            count += 1
            text, reason = request.stop.update(token, request.detokenizer.add(token))
            if grammar is not None and reason is None:
                grammar.accept(token)
                if grammar.finished:  # the grammar is complete (or broken): nothing more may follow
                    text, reason = text + request.stop.flush(), "stop"
            texts.append(text)
            if reason is not None:
                seq.finish_reason = reason
                self._finish(seq)
                del self.requests[seq.request_id]
                break
        return self._output(request, "".join(texts), tokens[:count], logprobs[:count] if logprobs else None, reason)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        if seq.params is not None and seq.params.lora is not None:
            self.lora.adapters[seq.params.lora].users.discard(seq.request_id)
        if self.speculator is not None:
            self.speculator.release(seq.request_id)

    def _finish_unsampled(self, request: _Request, reason: str) -> StepOutput:
        """End a request at a step that sampled nothing for it (max_tokens 0)."""
        seq = request.seq
        seq.finish_reason = reason
        output = self._output(request, "", [], None, reason)  # before _finish frees the sequence's blocks
        self._finish(seq)
        del self.requests[seq.request_id]
        return output

    def _score_prompt(self, request: _Request, scores: PromptScores) -> None:
        """Append the log-probabilities of the prompt tokens these logits predict. After a preemption the
        prompt is computed again from position 0: the rows scored before are skipped."""
        done = len(request.prompt_logprobs)
        skip = done - scores.first
        if skip >= scores.logits.shape[0]:
            return
        start = scores.first + skip + 1
        targets = request.seq.token_ids[start : start + scores.logits.shape[0] - skip]
        request.prompt_logprobs += token_logprobs(scores.logits[skip:], targets, request.sampling.params.prompt_logprobs)

    @torch.inference_mode()
    def embed(self, prompt_token_ids: list[int]) -> list[float]:
        """Mean-pooled final hidden states: a stand-in embedding for decoder models."""
        self.validate(prompt_token_ids, SamplingParams(max_tokens=1))
        seq = Sequence("embed", prompt_token_ids, None)
        # Embeddings must not publish half-useful prefix blocks, and must not wait behind generation.
        if not self.block_manager.allocate(seq):
            raise OutOfResources("the KV cache is full; retry the embedding request")
        try:
            total = torch.zeros(self.loaded.config.hidden_size, dtype=torch.float32, device=self.device)
            seq.num_computed_tokens = 0
            while seq.num_computed_tokens < len(seq):
                count = min(self.args.max_batched_tokens, len(seq) - seq.num_computed_tokens)
                hidden = self.runner.hidden_states(ScheduledChunk(seq, count))
                total += hidden.float().sum(0)
                seq.num_computed_tokens += count
            return (total / len(seq)).tolist()
        finally:
            self.block_manager.free_sequence(seq)

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": self.block_manager.num_used_blocks,
            "kv_blocks_total": len(self.block_manager.blocks),
            "prefix_hit_tokens": self.block_manager.hit_tokens,
            "prefix_miss_tokens": self.block_manager.miss_tokens,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "preemptions": self.scheduler.num_preemptions,
            **(self.speculator.stats() if self.speculator is not None else {}),
        }

    def running_sequences(self) -> list[dict]:
        """The sequences being computed, oldest first: what llama.cpp's /slots shows (call on the engine thread)."""
        result = []
        for seq in sorted(self.scheduler.running, key=lambda s: s.arrival):
            request = self.requests.get(seq.request_id)
            if request is not None:
                result.append({"request_id": seq.request_id, "params": seq.params, "output_tokens": seq.num_output_tokens,
                               "max_tokens": request.stop.max_tokens})
        return result

    def is_running(self, request_id: str) -> bool:
        request = self.requests.get(request_id)
        return request is not None and request.seq.status is not SequenceStatus.FINISHED
