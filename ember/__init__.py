"""ember: a local LLM inference engine and server on PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "ChatTemplate", "load_tokenizer", "__version__"]


def __getattr__(name: str):
    # Lazy, so that `ember --help` and light tools don't pay for importing torch.
    if name == "LLM":
        from ember.llm import LLM

        return LLM
    if name == "SamplingParams":
        from ember.sampling_params import SamplingParams

        return SamplingParams
    if name in ("ChatTemplate", "load_tokenizer"):
        from ember import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(name)
