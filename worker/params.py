"""SamplingParams: the per-request generation knobs, validated once at the boundary.

Names and meanings follow vLLM / the OpenAI API so that payloads port unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from worker.errors import RequestError

MAX_LOGPROBS = 20
# Bounds on the list parameters, so that one job cannot make stop matching or the sampler's
# per-request tensors arbitrarily expensive (OpenAI allows 4 stop strings; vLLM no limit).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 4096  # all stop strings together
MAX_STOP_TOKEN_IDS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. `temperature == 0` means greedy.

    `top_k == 0` disables top-k (-1 is accepted as an alias, as in vLLM);
    `seed` makes sampling reproducible whatever else shares the batch;
    `logprobs = N` returns the top-N alternatives of each chosen token.
    `special_tokens_in_content` is a prompt option, not a sampling one (it lives here so
    that every intake path validates it with the rest): True lets special-token text in
    chat message content (e.g. `<|im_start|>system`) become those special tokens; by
    default it is tokenized as the plain text it is.
    """

    max_tokens: int = 128
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    special_tokens_in_content: bool = False

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 1, "max_tokens must be >= 1")
        _check(0 <= self.min_tokens <= self.max_tokens, "min_tokens must be in [0, max_tokens]")
        _check(0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]")
        _check(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        _check(self.top_k >= -1, "top_k must be >= 0 (or -1 to disable)")
        _check(0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]")
        _check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]")
        _check(self.seed is None or 0 <= self.seed < 2**63, "seed must be in [0, 2**63)")
        _check(all(s for s in self.stop), "stop strings must be non-empty")
        _check(
            len(self.stop) <= MAX_STOP_STRINGS,
            f"stop: at most {MAX_STOP_STRINGS} strings (got {len(self.stop)})",
        )
        stop_chars = sum(len(s) for s in self.stop)
        _check(
            stop_chars <= MAX_STOP_CHARS,
            f"stop: at most {MAX_STOP_CHARS} characters in all (got {stop_chars})",
        )
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids must be >= 0")
        _check(
            len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
            f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids (got {len(self.stop_token_ids)})",
        )
        _check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
            f"logprobs must be in [0, {MAX_LOGPROBS}]",
        )
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)

    def check_vocab(self, vocab_size: int) -> None:
        """Reject token ids outside the model's vocabulary [0, vocab_size).

        Raises:
            RequestError(code="invalid_params") naming the first offending id.
        """
        for t in self.stop_token_ids:
            _check(
                t < vocab_size, f"stop_token_ids: {t} is outside the vocabulary [0, {vocab_size})"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, raw: Any) -> SamplingParams:
        """Build from a JSON/msgpack map, rejecting unknown names and wrong types.

        Raises:
            RequestError(code="invalid_params") with a message naming the field.
        """
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise RequestError("invalid_params", "params must be a map")
        kwargs: dict[str, Any] = {}
        for name, value in raw.items():
            if name not in _FIELD_TYPES:
                raise RequestError("invalid_params", f"unknown parameter {name!r}")
            kwargs[name] = _coerce(name, value)
        try:
            return cls(**kwargs)
        except RequestError:
            raise
        except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
            raise RequestError("invalid_params", str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


PARAM_NAMES = frozenset(f.name for f in fields(SamplingParams))


def merge_line_params(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Params of a JSONL line: `defaults`, then its `params` map, then top-level param names.

    Returns the merged, not yet validated map (`SamplingParams.from_dict` validates).

    Raises:
        RequestError(code="invalid_params"): `params` is not a map, or a name is given
            both at top level and in `params`.
    """
    nested = raw.get("params")
    if nested is None:
        nested = {}
    if not isinstance(nested, Mapping):
        raise RequestError("invalid_params", "params must be a map")
    top = {k: v for k, v in raw.items() if k in PARAM_NAMES}
    both = sorted(set(top) & set(nested))
    if both:
        raise RequestError(
            "invalid_params", f"{both[0]!r} is given both at top level and in params"
        )
    return {**defaults, **nested, **top}


def check_length_hint(value: Any) -> int | None:
    """A job's or line's optional `length_hint` (its predicted output tokens, not a sampling
    param: it changes admission, never the output).

    Raises:
        RequestError(code="invalid_request") unless None or a positive int (not a bool).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(
            "invalid_request", "length_hint must be a positive integer (predicted output tokens)"
        )
    return value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RequestError("invalid_params", message)


_FIELD_TYPES: dict[str, str] = {
    "max_tokens": "int",
    "min_tokens": "int",
    "temperature": "float",
    "top_p": "float",
    "top_k": "int",
    "min_p": "float",
    "repetition_penalty": "float",
    "presence_penalty": "float",
    "frequency_penalty": "float",
    "seed": "int?",
    "stop": "strs",
    "stop_token_ids": "ints",
    "ignore_eos": "bool",
    "logprobs": "int?",
    "skip_special_tokens": "bool",
    "include_stop_str_in_output": "bool",
    "special_tokens_in_content": "bool",
}


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELD_TYPES[name]
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    # NOTE: bool is a subclass of int in Python; `true` must not pass as max_tokens=1.
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError("invalid_params", f"{name} must be an integer")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError("invalid_params", f"{name} must be a number")
        if not math.isfinite(value):
            raise RequestError("invalid_params", f"{name} must be finite")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise RequestError("invalid_params", f"{name} must be a boolean")
        return value
    if kind == "strs":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
            raise RequestError("invalid_params", f"{name} must be a string or a list of strings")
        return tuple(value)  # counted and measured by SamplingParams
    if kind == "ints":
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value
        ):
            raise RequestError("invalid_params", f"{name} must be a list of integers")
        return tuple(value)
    raise AssertionError(kind)  # pragma: no cover
