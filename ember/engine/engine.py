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
from ember.engine.model_runner import ModelRunner
from ember.engine.outputs import StepOutput, TokenLogprob
from ember.engine.scheduler import ScheduledChunk, Scheduler
from ember.engine.sequence import Sequence, SequenceStatus
from ember.engine.stop import StopChecker
from ember.errors import InvalidParameter, OutOfResources
from ember.layers.sampler import Sampler, SamplingState
from ember.loader.model import LoadedModel, load_model
from ember.sampling_params import SamplingParams
from ember.store.memory import kv_bytes_per_token
from ember.store.resolve import resolve
from ember.tokenizer.detokenizer import IncrementalDetokenizer

log = logging.getLogger("ember.engine")

DEFAULT_MAX_MODEL_LEN = 8192


@dataclass
class EngineArgs:
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None  # default: the model's context, capped at 8192 unless asked
    # Bytes for the KV cache; default: max_num_seqs full contexts, within a share of the free memory.
    kv_memory: int | None = None
    block_size: int = 16
    max_num_seqs: int = 32
    max_batched_tokens: int = 512
    threads: int | None = None  # torch's CPU threads, process-wide; default: torch's (the physical cores)

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidParameter(name, "must be a positive integer")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidParameter("max_model_len", "must be at least 2")
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 1):
            raise InvalidParameter("threads", f"must be a positive integer, got {self.threads!r}")


@dataclass
class _Request:
    seq: Sequence
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    text: list[str] = field(default_factory=list)


def _default_kv_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.6)
    return int(psutil.virtual_memory().available * 0.2)


class LLMEngine:
    def __init__(self, model: str, args: EngineArgs | None = None, loaded: LoadedModel | None = None):
        self.args = args or EngineArgs()
        if self.args.threads is not None:
            # Before loading, so weight repacking uses them too; the native kernels read torch's count as well.
            torch.set_num_threads(self.args.threads)
        if loaded is None:
            resolved = resolve(model, allow_paths=True)
            loaded = load_model(resolved.path, dtype=self.args.dtype, device=self.args.device, name=resolved.name)
        self.loaded = loaded
        config, self.tokenizer = self.loaded.config, self.loaded.tokenizer
        self.model_name = self.loaded.name
        self.device = self.loaded.device
        limit = config.max_position_embeddings
        self.max_model_len = min(self.args.max_model_len or min(limit, DEFAULT_MAX_MODEL_LEN), limit)
        block_size = self.args.block_size
        per_token = kv_bytes_per_token(config, self.loaded.dtype.itemsize)
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
        self.runner = ModelRunner(self.loaded.model, config, self.device, self.loaded.dtype, block_size, self.num_blocks)
        self.sampler = Sampler()
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

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise InvalidParameter("request_id", f"{request_id!r} is already running")
        self.validate(prompt_token_ids, params)
        seq = Sequence(request_id, prompt_token_ids, params)
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
        self.requests[request_id] = _Request(seq, sampling, detokenizer, stop)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> StepOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.finish(request.seq)
        return self._output(request, request.stop.flush(), [], None, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _output(self, request, text, token_ids, logprobs, finish_reason) -> StepOutput:
        seq = request.seq
        return StepOutput(
            request_id=seq.request_id, text_delta=text, token_ids=token_ids, logprobs=logprobs,
            finished=finish_reason is not None, finish_reason=finish_reason,
            prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
            cached_tokens=seq.num_cached_tokens,
        )

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        started = self.clock()
        sampled, logits = self.runner.run(chunks)
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.register_computed(chunk.seq)
            if chunk.seq.num_output_tokens == 0:
                self.prompt_tokens_total += chunk.num_tokens
        if not sampled:
            # Not timed: nothing here waits for the device (CUDA and MPS run asynchronously).
            return []
        requests = [self.requests[c.seq.request_id] for c in sampled]
        tokens, logprobs = self.sampler(logits, [r.sampling for r in requests])
        outputs = [self._advance(r, t, lp) for r, t, lp in zip(requests, tokens, logprobs, strict=True)]
        # The whole step, as the streams see it between two tokens.
        self.scheduler.observe_step(self.clock() - started)
        return outputs

    def _advance(self, request: _Request, token: int, logprob: TokenLogprob | None) -> StepOutput:
        seq = request.seq
        seq.token_ids.append(token)
        request.sampling.output_token_ids.append(token)
        self.generation_tokens_total += 1
        text, reason = request.stop.update(token, request.detokenizer.add(token))
        grammar = request.sampling.grammar
        if grammar is not None and reason is None:
            grammar.accept(token)
            if grammar.finished:  # the grammar is complete (or broken): nothing more may follow
                text, reason = text + request.stop.flush(), "stop"
        if reason is not None:
            seq.finish_reason = reason
            self.scheduler.finish(seq)
            del self.requests[seq.request_id]
        return self._output(request, text, [token], [logprob] if logprob else None, reason)

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
        }

    def is_running(self, request_id: str) -> bool:
        request = self.requests.get(request_id)
        return request is not None and request.seq.status is not SequenceStatus.FINISHED
