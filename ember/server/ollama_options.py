"""Ollama's request `options` → SamplingParams (and the context, num_ctx), with Ollama's defaults under the
model's own (ModelInfo.defaults) under the request's. Every option ember does not honour is refused by name.

Ollama's defaults: temperature 0.8, top_k 40, top_p 0.9, min_p 0, repeat_penalty 1.1 over the last
repeat_last_n = 64 tokens (-1: the whole context, 0: no penalty), num_predict -1 (no limit).
"""

from __future__ import annotations

from typing import Any

from ember.errors import InvalidParameter
from ember.sampling_params import SamplingParams

# Ollama option -> SamplingParams field
SAMPLING_OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                    "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                    "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop",
                    "speculative": "speculative"}  # ember's extension: false opts out of speculative decoding
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1,
                   "repetition_window": 64}
MAX_NUM_CTX = 1 << 20
# Options Ollama defines that ember does not honour, with why (the 400 says it).
NOT_HONOURED = {
    "num_keep": "ember never shifts a full context, so there is nothing to keep",
    "typical_p": "typical sampling is not implemented", "tfs_z": "tail-free sampling is not implemented",
    "mirostat": "mirostat sampling is not implemented", "mirostat_tau": "mirostat sampling is not implemented",
    "mirostat_eta": "mirostat sampling is not implemented",
    "penalize_newline": "newlines are penalized like any token",
    "num_batch": "the batch is set at `ember serve` (--max-num-batched-tokens)",
    "num_gpu": "layers are not split between devices", "main_gpu": "the device is set at `ember serve` (--device)",
    "num_thread": "threads are set for the process (OMP_NUM_THREADS)", "numa": "NUMA placement is not controlled",
    "low_vram": "not applicable", "f16_kv": "the KV cache dtype follows --dtype", "vocab_only": "not applicable",
    "use_mmap": "GGUF files are always memory-mapped", "use_mlock": "memory is never locked",
    "embedding_only": "not applicable", "logits_all": "not applicable",
}


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(f"options.{name}", f"must be a number, got {value!r}")
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(f"options.{name}", f"must be an integer, got {value!r}")
    return value


def check_options(options: Any, allowed: set[str] | None = None) -> dict[str, Any]:
    """The options object, checked: a JSON object whose every key ember honours (or `allowed`)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidParameter("options", "must be an object")
    known = allowed if allowed is not None else {*SAMPLING_OPTIONS, "num_predict", "num_ctx", "repeat_last_n"}
    for key, value in options.items():
        if key in known or value is None:
            continue
        why = NOT_HONOURED.get(key, "not an option ember knows")
        raise InvalidParameter(f"options.{key}", f"is not supported ({why})")
    return {k: v for k, v in options.items() if v is not None}


def num_ctx(options: dict[str, Any]) -> int | None:
    """The context the request wants the model loaded with (Ollama reloads a model for a new num_ctx)."""
    if "num_ctx" not in options:
        return None
    value = _integer("num_ctx", options["num_ctx"])
    if not 1 <= value <= MAX_NUM_CTX:
        raise InvalidParameter("options.num_ctx", f"must be between 1 and {MAX_NUM_CTX}, got {value}")
    return value


def ollama_params(options: dict[str, Any], model_defaults: dict[str, Any] | None = None) -> SamplingParams:
    """SamplingParams from checked options (check_options) over the model's and Ollama's defaults."""
    kwargs: dict[str, Any] = {**OLLAMA_DEFAULTS, **(model_defaults or {}), "max_tokens": None}
    for key, field in SAMPLING_OPTIONS.items():
        if key in options:
            kwargs[field] = options[key]
    if "repeat_last_n" in options:
        last = _integer("repeat_last_n", options["repeat_last_n"])
        if last < -1:
            raise InvalidParameter("options.repeat_last_n", f"must be -1 (whole context), 0 (off) or a count, "
                                                            f"got {last}")
        kwargs["repetition_window"] = None if last == -1 else last
    if kwargs.get("repetition_window") == -1:
        kwargs["repetition_window"] = None
    if kwargs.get("repetition_window") == 0:  # Ollama's repeat_last_n 0: no repetition penalty at all
        kwargs["repetition_window"], kwargs["repetition_penalty"] = None, 1.0
    if "num_predict" in options:
        value = _integer("num_predict", options["num_predict"])
        if value == 0:
            raise InvalidParameter("options.num_predict", "must be positive, or -1 for no limit")
        kwargs["max_tokens"] = None if value < 0 else value  # -1: unlimited, -2: fill the context
    try:
        return SamplingParams(**kwargs)
    except InvalidParameter as err:  # name the option the client sent, not ember's field
        option = next((k for k, f in SAMPLING_OPTIONS.items() if f == err.field), err.field)
        raise InvalidParameter(f"options.{option}", str(err).split(": ", 1)[-1]) from None
