"""ember: a local LLM inference engine and server on PyTorch."""

from __future__ import annotations

import os
import sys

# The native CPU kernels (ember.kernels) run their own thread pool between torch's ops: torch's OpenMP threads
# must not keep spinning after each op on the cores that pool needs (measured: 2-thread decode 3-4x slower).
# Effective only before torch is imported; a user's own setting wins.
OMP_PASSIVE = "torch" not in sys.modules or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
OMP_SET_BY_EMBER = "OMP_WAIT_POLICY" not in os.environ  # child processes of other engines should not inherit it
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
