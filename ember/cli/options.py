"""Command-line options shared by the commands that load a model or sample from it."""

from __future__ import annotations

import argparse

from ember.store.memory import KV_CACHE_DTYPES


def add_model_options(parser: argparse.ArgumentParser, kv_default: str, *, threads: bool = True,
                      max_num_seqs: bool = False, lora: str | None = None) -> None:
    """The engine's options; `kv_default` says how the command sizes the KV cache without --kv-memory.
    `threads`: add -t/--threads (`ember bench` has its own, a sweep). `max_num_seqs`: add --max-num-seqs (only
    the server decodes an open number of sequences: `run` has one, `bench` its -c). `lora`: add --lora, with
    this help text (the commands that use the adapters: `run`, `serve`)."""
    group = parser.add_argument_group("model")
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weights/activations dtype (auto: float32 on CPU, the checkpoint's on GPU)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    group.add_argument("--max-model-len", type=int, default=None, help="context length (default: model's, ≤ 8192)")
    group.add_argument("--kv-memory", type=_size, default=None,
                       help=f"KV cache size, e.g. 2G or 512M (default: {kv_default})")
    group.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                       help="KV cache storage: auto (the activation dtype) or int8 (per-token-per-head scales: half "
                            "a 16-bit cache; docs/kv-cache.md)")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    if max_num_seqs:
        group.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together")
    group.add_argument("--max-batched-tokens", type=int, default=512, help="token budget of one engine step")
    if threads:
        group.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                           help="CPU threads (default: torch's, one per physical core)")
    if lora is not None:
        adapters = parser.add_argument_group("LoRA adapters (docs/lora.md)")
        adapters.add_argument("--lora", action="append", default=None, metavar="[NAME=]PATH[:SCALE]", help=lora)
        adapters.add_argument("--lora-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                              help="adapters' dtype (auto: bfloat16 on CPUs with AVX512-BF16 running float32, else "
                                   "the activation dtype)")
    spec = parser.add_argument_group("speculative decoding (docs/speculative.md)")
    spec.add_argument("--draft", default=None, metavar="MODEL",
                      help="a smaller model with the same vocabulary drafts tokens the model verifies")
    spec.add_argument("--spec-ngram", type=int, default=None, metavar="N",
                      help="draft by looking up the last N (down to 1) tokens earlier in prompt + output")
    spec.add_argument("--spec-tokens", type=int, default=4, metavar="K", help="tokens drafted per step (default 4)")


def engine_args(args: argparse.Namespace, **command) -> dict:
    """EngineArgs fields from add_model_options' options; `command` adds or overrides what the command
    decides itself (max_num_seqs, threads, ...)."""
    return {
        "dtype": args.dtype, "device": args.device, "max_model_len": args.max_model_len,
        "kv_memory": args.kv_memory, "kv_cache_dtype": args.kv_cache_dtype, "block_size": args.block_size, "max_batched_tokens": args.max_batched_tokens,
        "draft": args.draft, "spec_ngram": args.spec_ngram, "spec_tokens": args.spec_tokens,
        "lora": getattr(args, "lora", None), "lora_dtype": getattr(args, "lora_dtype", "auto"),
        **command,
    }


def existing_adapters(value) -> list:
    """--lora's specs (ember.engine.lora_spec.LoraSpec), each naming a path that exists (else a one-line error)."""
    from pathlib import Path

    from ember.engine.lora_spec import lora_specs
    from ember.errors import InvalidParameter

    specs = lora_specs(value)
    for spec in specs:
        if not Path(spec.path).exists():
            raise InvalidParameter("--lora", f"{spec.path} does not exist (give [NAME=]PATH[:SCALE])")
    return specs


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=512, help="tokens to generate per reply")
    group.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=0.9)
    group.add_argument("--top-k", type=int, default=40)
    group.add_argument("--min-p", type=float, default=0.05)
    group.add_argument("--repeat-penalty", type=float, default=1.1)
    group.add_argument("--seed", type=int, default=None)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
        "top_k": args.top_k, "min_p": args.min_p, "repetition_penalty": args.repeat_penalty, "seed": args.seed,
    }


def _size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)") from None
