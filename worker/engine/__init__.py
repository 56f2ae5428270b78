"""The inference engine: scheduler → model runner → sampler over a paged KV cache.

The names other packages use are exported here; `Engine` (torch, transformers) is
imported on first use, so `from worker.engine import Request` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worker.engine.output import OutputAccumulator, logprobs_to_dicts
from worker.engine.sequence import Completion, Request, TokenLogprobs, TokenOutput, Usage
from worker.params import SamplingParams

if TYPE_CHECKING:
    from worker.engine.engine import Engine

__all__ = [
    "Completion",
    "Engine",
    "OutputAccumulator",
    "Request",
    "SamplingParams",
    "TokenLogprobs",
    "TokenOutput",
    "Usage",
    "logprobs_to_dicts",
]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from worker.engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'worker.engine' has no attribute {name!r}")
