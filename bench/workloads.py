"""Benchmark workloads: reproducible sets of (random prompt tokens, output length) requests.

Prompts are random ids from the vocabulary (special tokens excluded) so that the prompt
lengths are exact and no tokenizer round trip blurs them; outputs run to their length
(`ignore_eos`), so both engines do the same work.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchRequest:
    """One request. It generates `output_len` tokens: its max_tokens, unless `max_tokens` is
    larger and one of `stop_token_ids` ends it there (the bimodal workload's short half)."""

    prompt_token_ids: tuple[int, ...]
    output_len: int
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int | None = None  # None: output_len

    @property
    def needs_stop(self) -> bool:
        """Meant to stop early, but its stop token is not chosen yet (`calibrate_stops`)."""
        return (
            self.max_tokens is not None
            and self.max_tokens > self.output_len
            and not (self.stop_token_ids)
        )


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

    def peak_kv_blocks(self, block_size: int) -> int:
        """KV pages every request needs at its longest, all at once (what no preemption
        would take with the whole workload running together)."""
        return sum(
            -(-(len(r.prompt_token_ids) + (r.max_tokens or r.output_len)) // block_size)
            for r in self.requests
        )

    def dump(self, path: str | Path) -> None:
        """Write the workload as JSON (`{"name", "requests": [{"prompt_token_ids",
        "output_len"}, ...]}`), so that other engines can be fed identical requests."""
        requests = [_request_dict(r) for r in self.requests]
        Path(path).write_text(json.dumps({"name": self.name, "requests": requests}))

    @classmethod
    def load(cls, path: str | Path, vocab_size: int | None = None) -> Workload:
        """Read a file written by `dump`. Raises ValueError on a malformed file, or on token
        ids outside [0, vocab_size) when `vocab_size` is given."""
        data = json.loads(Path(path).read_text())
        try:
            requests = tuple(
                BenchRequest(
                    tuple(int(t) for t in r["prompt_token_ids"]),
                    int(r["output_len"]),
                    tuple(int(t) for t in r.get("stop_token_ids", ())),
                    None if r.get("max_tokens") is None else int(r["max_tokens"]),
                )
                for r in data["requests"]
            )
            name = str(data.get("name", Path(path).stem))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a workload file ({exc!r})") from exc
        for i, r in enumerate(requests):
            if not r.prompt_token_ids or r.output_len < 1:
                raise ValueError(f"{path}: request {i} needs a prompt and output_len >= 1")
            if vocab_size is not None and not all(0 <= t < vocab_size for t in r.prompt_token_ids):
                raise ValueError(f"{path}: request {i} has token ids outside [0, {vocab_size})")
        return cls(name=name, requests=requests)


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
    """`batch` requests of exactly `prompt_len` prompt and `output_len` output tokens
    (batch 1 is the "single" workload: one stream, latency-bound)."""
    if min(prompt_len, output_len, batch) < 1:
        raise ValueError("prompt_len, output_len and batch must be >= 1")
    rng = random.Random(seed)
    requests = tuple(
        BenchRequest(_random_prompt(rng, token_ids, prompt_len), output_len) for _ in range(batch)
    )
    kind = "single" if batch == 1 else "uniform"
    return Workload(name=f"{kind}(P={prompt_len}, O={output_len}, B={batch})", requests=requests)


def shared_prefix_workload(
    token_ids: Sequence[int],
    num_requests: int = 64,
    prefix_len: int = 512,
    suffix_range: tuple[int, int] = (32, 128),
    output_len: int = 64,
    seed: int = 0,
) -> Workload:
    """`num_requests` requests that share one `prefix_len`-token prefix (a bulk job's system
    prompt or few-shot examples), each followed by its own suffix of a length uniform in
    `suffix_range`, and `output_len` output tokens each."""
    low, high = suffix_range
    if not 0 <= low <= high or prefix_len < 0 or min(num_requests, output_len) < 1:
        raise ValueError(
            "need 0 <= suffix low <= high, prefix_len >= 0, num_requests, output_len >= 1"
        )
    if prefix_len + low < 1:
        raise ValueError("every prompt needs at least one token")
    rng = random.Random(seed)
    prefix = _random_prompt(rng, token_ids, prefix_len)
    requests = tuple(
        BenchRequest(prefix + _random_prompt(rng, token_ids, rng.randint(low, high)), output_len)
        for _ in range(num_requests)
    )
    name = (
        f"shared-prefix(n={num_requests}, prefix={prefix_len}, suffix={low}-{high}, "
        f"O={output_len}, seed={seed})"
    )
    return Workload(name=name, requests=requests)


def bimodal_workload(
    token_ids: Sequence[int],
    num_requests: int = 64,
    seed: int = 0,
    prompt_range: tuple[int, int] = (32, 512),
    short_len: int = 16,
    long_len: int = 256,
) -> Workload:
    """Half the requests (drawn at random) stop after ~`short_len` tokens by a stop token,
    the other half run to `long_len`; every one has max_tokens `long_len`, so only the stop
    tells them apart. Prompt lengths are log-uniform in `prompt_range`.

    The short half's stop tokens are not known yet (`needs_stop`): `bench.admission.
    calibrate_stops` picks, per request, the token the model greedily emits at `short_len`.
    """
    if not 1 <= short_len < long_len:
        raise ValueError("need 1 <= short_len < long_len")
    rng = random.Random(seed)
    short = set(rng.sample(range(num_requests), num_requests // 2))
    requests = tuple(
        BenchRequest(
            _random_prompt(rng, token_ids, _log_uniform(rng, *prompt_range)),
            short_len if i in short else long_len,
            max_tokens=long_len,
        )
        for i in range(num_requests)
    )
    name = f"bimodal(n={num_requests}, {short_len} by stop | {long_len}, seed={seed})"
    return Workload(name=name, requests=requests)


def _request_dict(r: BenchRequest) -> dict:
    out: dict = {"prompt_token_ids": list(r.prompt_token_ids), "output_len": r.output_len}
    if r.stop_token_ids:
        out["stop_token_ids"] = list(r.stop_token_ids)
    if r.max_tokens is not None:
        out["max_tokens"] = r.max_tokens
    return out


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got [{low}, {high}]")
    value = round(math.exp(rng.uniform(math.log(low), math.log(high))))
    return min(max(value, low), high)


def _random_prompt(rng: random.Random, token_ids: Sequence[int], length: int) -> tuple[int, ...]:
    return tuple(rng.choices(token_ids, k=length))
