"""Benchmark workloads: reproducible sets of (random prompt tokens, output length) requests.

Prompts are random ids from the vocabulary (special tokens excluded) so that the prompt
lengths are exact and no tokenizer round trip blurs them; outputs run to their length
(`ignore_eos`), so both engines do the same work.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: tuple[int, ...]
    output_len: int


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[BenchRequest, ...]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)


def sampleable_token_ids(tokenizer: object, vocab_size: int | None = None) -> list[int]:
    """Ids of ordinary tokens: the tokenizer's ids below `vocab_size`, minus special/added ones."""
    size = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return [i for i in range(size) if i not in excluded]


def mixed_workload(
    token_ids: Sequence[int],
    num_requests: int = 64,
    seed: int = 0,
    prompt_range: tuple[int, int] = (32, 512),
    output_range: tuple[int, int] = (16, 256),
) -> Workload:
    """`num_requests` requests, prompt and output lengths log-uniform in their ranges."""
    rng = random.Random(seed)
    requests = tuple(
        BenchRequest(
            prompt_token_ids=_random_prompt(rng, token_ids, _log_uniform(rng, *prompt_range)),
            output_len=_log_uniform(rng, *output_range),
        )
        for _ in range(num_requests)
    )
    return Workload(name=f"mixed(n={num_requests}, seed={seed})", requests=requests)


def uniform_workload(
    token_ids: Sequence[int], prompt_len: int, output_len: int, batch: int, seed: int = 0
) -> Workload:
    """`batch` requests of exactly `prompt_len` prompt and `output_len` output tokens."""
    if min(prompt_len, output_len, batch) < 1:
        raise ValueError("prompt_len, output_len and batch must be >= 1")
    rng = random.Random(seed)
    requests = tuple(
        BenchRequest(_random_prompt(rng, token_ids, prompt_len), output_len) for _ in range(batch)
    )
    return Workload(name=f"uniform(P={prompt_len}, O={output_len}, B={batch})", requests=requests)


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got [{low}, {high}]")
    value = round(math.exp(rng.uniform(math.log(low), math.log(high))))
    return min(max(value, low), high)


def _random_prompt(rng: random.Random, token_ids: Sequence[int], length: int) -> tuple[int, ...]:
    return tuple(rng.choices(token_ids, k=length))
