"""LengthPredictor: how many tokens a request will generate, learnt from finished ones.

Predicted-length admission (`SchedulerConfig.admission == "predicted"`) admits a request
only when the pages it is predicted to need fit beside what the running ones are predicted
to still need. The prediction is an online quantile (p90 by default, not the mean: a
prediction that is too short costs a preemption, one that is too long only some
concurrency) of the completion lengths of finished requests that look alike, bounded by
`max_tokens`. Pure Python, no tensors.

Requests look alike when they share a key: the `max_tokens` bucket, the prompt-length
bucket (both powers of two) and whether an explicit stop (strings or token ids) is set.
A key with too few samples falls back to a coarser one (the prompt bucket dropped); with
none, `predict` returns None and the scheduler falls back to first come, first served.
A producer's `length_hint` overrides all of this.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from worker.params import SamplingParams

# (max_tokens bucket, prompt-length bucket or None for the coarse key, explicit stop set)
_Key = tuple[int, int | None, bool]


@dataclass(frozen=True)
class PredictorConfig:
    """quantile: of the completion lengths (0.9 → p90); min_samples: a key answers once it
    has this many; window: samples kept per key, newest last, so the predictor adapts."""

    quantile: float = 0.9
    min_samples: int = 8
    window: int = 256

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile <= 1.0 or self.min_samples < 1 or self.window < 1:
            raise ValueError("need 0 < quantile <= 1, min_samples >= 1, window >= 1")
        if self.min_samples > self.window:
            raise ValueError("min_samples must fit in the window")


def _bucket(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def _keys(num_prompt_tokens: int, params: SamplingParams) -> tuple[_Key, _Key]:
    """The fine key, then the coarse one it falls back to."""
    stop = bool(params.stop or params.stop_token_ids)
    max_bucket = _bucket(params.max_tokens)
    return (max_bucket, _bucket(num_prompt_tokens), stop), (max_bucket, None, stop)


class _Window:
    """The last `size` samples of one key and their quantile, recomputed only when stale."""

    def __init__(self, size: int) -> None:
        self.samples: deque[int] = deque(maxlen=size)
        self._quantile: int | None = None

    def add(self, value: int) -> None:
        self.samples.append(value)
        self._quantile = None

    def quantile(self, q: float) -> int:
        if self._quantile is None:
            ordered = sorted(self.samples)
            # Nearest rank: the smallest sample with at least q of them at or below it.
            self._quantile = ordered[max(math.ceil(q * len(ordered)) - 1, 0)]
        return self._quantile


class LengthPredictor:
    """Keyed online quantile of finished requests' completion lengths.

    Args:
        config: quantile, samples needed before a key answers, samples kept per key.
    """

    def __init__(self, config: PredictorConfig | None = None) -> None:
        self.config = config or PredictorConfig()
        self._windows: dict[_Key, _Window] = {}

    @property
    def num_keys(self) -> int:
        return len(self._windows)

    def observe(self, num_prompt_tokens: int, params: SamplingParams, num_output: int) -> None:
        """Record that a request of this shape finished after `num_output` tokens."""
        for key in _keys(num_prompt_tokens, params):
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = _Window(self.config.window)
            window.add(num_output)

    def predict(
        self, num_prompt_tokens: int, params: SamplingParams, length_hint: int | None = None
    ) -> int | None:
        """Predicted completion length in [1, max_tokens], or None: too little seen yet.

        A `length_hint` (the producer knows best) wins over what was seen.
        """
        if length_hint is not None:
            return max(1, min(length_hint, params.max_tokens))
        for key in _keys(num_prompt_tokens, params):
            window = self._windows.get(key)
            if window is not None and len(window.samples) >= self.config.min_samples:
                return max(1, min(window.quantile(self.config.quantile), params.max_tokens))
        return None

    def clear(self) -> None:
        """Forget every sample (after the engine's warm-up request)."""
        self._windows.clear()
