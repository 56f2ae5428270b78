"""The `headrace generate` verb: JSONL requests in, the engine in-process (no Redis), JSONL out.

Input lines: `{"id", "prompt" | "messages" | "prompt_token_ids", "params": {...}}`; the
sampling flags are the defaults that each line's `params` override. Output lines, in input
order: `{"id", "text", "token_ids", "finish_reason", "usage"}` (+ `"logprobs"` when asked),
or `{"id", "error": {"code", "message"}}` for a line that cannot be served.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from worker.cli.options import add_engine_args, engine_config_from_args
from worker.engine import Completion, Request, logprobs_to_dicts
from worker.errors import RequestError
from worker.params import SamplingParams

if TYPE_CHECKING:
    from worker.engine.engine import Engine

log = logging.getLogger(__name__)

# Sampling flags, named as their SamplingParams fields: defaults each line's params override.
_SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="run JSONL requests through the engine in-process (no Redis)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--input", required=True, help="JSONL requests ('-' = stdin)")
    parser.add_argument("--output", required=True, help="JSONL results ('-' = stdout)")
    parser.add_argument(
        "--show", action="store_true", help="also print each result's id and text, readably"
    )
    add_engine_args(parser)
    sampling = parser.add_argument_group("default sampling params (per-line params override)")
    sampling.add_argument("--max-tokens", type=int, default=None)
    sampling.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    sampling.add_argument("--top-p", type=float, default=None)
    parser.set_defaults(func=run)


def sampling_defaults_from_args(args: argparse.Namespace) -> SamplingParams:
    """Raises RequestError("invalid_params") when a flag is out of range."""
    given = {name: getattr(args, name) for name in _SAMPLING_FLAGS}
    return SamplingParams.from_dict({k: v for k, v in given.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from worker.engine.engine import Engine  # torch import: only when the verb runs

    try:
        defaults = sampling_defaults_from_args(args)
    except RequestError as exc:
        log.error("bad sampling flag: %s", exc.message)
        return 2
    lines = _read_lines(args.input)
    engine = Engine(engine_config_from_args(args))
    results = generate_lines(engine, lines, defaults)
    to_stdout = args.output == "-"
    _write_jsonl(args.output, results)
    if args.show:
        _show(results, sys.stderr if to_stdout else sys.stdout)
    num_errors = sum("error" in r for r in results)
    log.info("%d results (%d errors) → %s", len(results), num_errors, args.output)
    return 0


def generate_lines(engine: Engine, lines: Iterable[str], defaults: SamplingParams) -> list[dict]:
    """Turn JSONL lines into result dicts, one per non-blank line, in input order.

    A line that cannot be parsed or validated gets an error result here; the others run
    together in one `engine.generate` call, which reports its own per-request errors.
    """
    from worker.engine.prompts import request_from_dict

    results: list[dict] = []
    requests: list[Request] = []
    slots: list[int] = []  # index in results of each request, filled after generate
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fallback_id = f"line-{number}"
        try:
            raw = _parse_object(line)
        except RequestError as exc:
            results.append({"id": fallback_id, "error": exc.to_dict()})
            continue
        try:
            request = request_from_dict(
                raw,
                engine.tokenizer,
                max_model_len=engine.max_model_len,
                vocab_size=engine.vocab_size,
                defaults=defaults,
                request_id=fallback_id,
            )
        except RequestError as exc:
            results.append({"id": _line_id(raw, fallback_id), "error": exc.to_dict()})
            continue
        slots.append(len(results))
        results.append({"id": request.request_id})
        requests.append(request)
    if requests:
        # generate returns one Completion per request, in order, even for duplicate ids.
        for slot, completion in zip(slots, engine.generate(requests), strict=True):
            results[slot] = completion_to_dict(completion)
    return results


def completion_to_dict(completion: Completion) -> dict:
    """The output line of one completion (JSON-ready: lists and plain numbers)."""
    if completion.error is not None:
        return {"id": completion.request_id, "error": dict(completion.error)}
    out: dict[str, Any] = {
        "id": completion.request_id,
        "text": completion.text,
        "token_ids": list(completion.token_ids),
        "finish_reason": completion.finish_reason,
        "usage": {
            "prompt_tokens": completion.usage.prompt_tokens,
            "completion_tokens": completion.usage.completion_tokens,
        },
    }
    if completion.logprobs is not None:
        out["logprobs"] = logprobs_to_dicts(completion.logprobs)
    return out


def _parse_object(line: str) -> dict:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RequestError("invalid_request", f"not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise RequestError("invalid_request", "each line must be a JSON object")
    return raw


def _line_id(raw: dict, fallback: str) -> str:
    """The line's own id when it has a usable one (what an error line reports)."""
    line_id = raw.get("id")
    if isinstance(line_id, (str, int)) and not isinstance(line_id, bool) and line_id != "":
        return str(line_id)
    return fallback


def _read_lines(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    return Path(path).read_text(encoding="utf-8").splitlines()


def _write_jsonl(path: str, results: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")


def _show(results: list[dict], stream: TextIO) -> None:
    for result in results:
        if "error" in result:
            body = f"ERROR {result['error']['code']}: {result['error']['message']}"
        else:
            body = f"[{result['finish_reason']}, {result['usage']['completion_tokens']} tokens] "
            body += result["text"].strip()
        stream.write(f"── {result['id']}\n{body}\n\n")
    stream.flush()
