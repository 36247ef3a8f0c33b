"""How many prompt tokens a step may add to running decodes, learnt from the device's measured speed.

Every decode of a step waits for the step's prefill chunks, so one large chunk stalls every stream: on a
slow CPU a 512-token chunk takes seconds. StepBudget measures two things from real steps, the time of a
decode-only step and the time one prefill token adds to a step, and while decodes run it caps a step's
prefill tokens so that the step takes at most `max_step_ratio` decode-only steps (never fewer than
`min_prefill_tokens`, so prompts always progress). With no decode running, prefill gets the whole
`max_tokens`: time to first token is then all that matters.
"""

from __future__ import annotations

import math


class StepBudget:
    def __init__(self, max_tokens: int, min_prefill_tokens: int = 16, max_step_ratio: float = 2.0,
                 smoothing: float = 0.25):
        self.max_tokens = max_tokens
        self.min_prefill_tokens = min(min_prefill_tokens, max_tokens)
        self.max_step_ratio = max_step_ratio
        self.smoothing = smoothing  # weight of a new measurement in the moving averages
        self.decode_seconds: float | None = None  # a decode-only step of about `decode_count` decodes
        self.decode_count = 0
        self.prefill_token_seconds: float | None = None  # what one prefill token adds to a step
        # Prefill tokens of the largest step measured: costs are not extrapolated far beyond it.
        self.largest_measured = 0

    def _measured_for(self, num_decodes: int) -> bool:
        # Decode time grows with the number of streams on a CPU; within 2x of the measured count the
        # estimate is close enough, beyond it a fresh decode-only step is worth one step of prefill.
        return self.decode_seconds is not None and self.decode_count / 2 <= num_decodes <= 2 * self.decode_count

    def prefill_limit(self, num_decodes: int) -> int:
        """The most prefill tokens a step may take beside `num_decodes` running decodes."""
        if num_decodes == 0:
            return self.max_tokens
        if not self._measured_for(num_decodes):
            return 0  # a decode-only step: it measures the time the cap is relative to
        if self.prefill_token_seconds is None:
            return self.min_prefill_tokens
        spare = (self.max_step_ratio - 1) * self.decode_seconds
        limit = spare / self.prefill_token_seconds if self.prefill_token_seconds > 0 else math.inf
        # A per-token cost measured on small chunks can understate larger ones (a CPU's matmuls are
        # cheap per row until they become compute-bound): the cap at most doubles past what was measured.
        limit = min(limit, 2 * self.largest_measured, self.max_tokens)
        return max(self.min_prefill_tokens, int(limit))

    def observe(self, num_decodes: int, num_prefill_tokens: int, seconds: float) -> None:
        """Learn from one step that computed `num_decodes` decodes and `num_prefill_tokens` prompt tokens."""
        if num_prefill_tokens == 0:
            if num_decodes == 0:
                return
            if self._measured_for(num_decodes):
                self.decode_seconds = self._average(self.decode_seconds, seconds)
            else:
                self.decode_seconds = seconds
            self.decode_count = num_decodes
            return
        if num_prefill_tokens < self.min_prefill_tokens:
            return  # the step's fixed cost and timer noise would dominate the per-token figure
        if num_decodes:
            if not self._measured_for(num_decodes):
                return
            seconds -= self.decode_seconds
        # Without decodes the step's fixed cost is counted as prefill: an overestimate, on the safe side.
        sample = max(seconds, 0.0) / num_prefill_tokens
        current = self.prefill_token_seconds
        # A rise is believed at once (underestimating stalls every stream), a fall only gradually.
        if current is None or sample > current:
            self.prefill_token_seconds = sample
        else:
            self.prefill_token_seconds = self._average(current, sample)
        self.largest_measured = max(self.largest_measured, num_prefill_tokens)

    def _average(self, current: float, sample: float) -> float:
        return current + self.smoothing * (sample - current)
