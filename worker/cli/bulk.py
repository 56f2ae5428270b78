"""The `headrace bulk` verb: a JSONL file (simple or OpenAI Batch format) through the workers.

`headrace bulk IN.jsonl -o OUT.jsonl` needs nothing else: without --redis-url (and
$HEADRACE_REDIS_URL) it starts an embedded Redis and one local worker (--model...).
Re-running with the same OUT resumes: ids already there are skipped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from producer.bulk_formats import FORMATS
from producer.client import REDIS_URL_ENV
from producer.lost_jobs import WatchConfig
from worker.cli.options import ENGINE_OPTIONS, OPTIONS, add_arguments, as_flags

log = logging.getLogger(__name__)

NAMESPACE_ENV = "HEADRACE_NAMESPACE"
EXIT_INTERRUPTED = 130
# `headrace worker` options that make sense for the local worker (the rest are defaults).
_LOCAL_WORKER_OPTIONS = (*ENGINE_OPTIONS, *(o for o in OPTIONS if o.dest == "max_inflight"))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bulk",
        help="run a JSONL file of requests through the workers into a JSONL file (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, help="JSONL requests (simple or OpenAI Batch format)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="JSONL results")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get(REDIS_URL_ENV),
        help=f"workers' Redis (default ${REDIS_URL_ENV}; unset → embedded Redis + local worker)",
    )
    parser.add_argument("--namespace", default=os.environ.get(NAMESPACE_ENV, "headrace"))
    parser.add_argument("--window", type=int, default=256, help="jobs in flight at most")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--priority",
        type=int,
        default=0,
        help="priority of the lines that give none (OpenAI lines cannot): < 0 queues them "
        "behind other jobs, > 0 ahead (docs/protocol.md, Priority)",
    )
    parser.add_argument(
        "--lost-after",
        type=float,
        default=WatchConfig.lost_after_s,
        metavar="SECONDS",
        help="resubmit a job that has had no result, queue entry or pending entry in Redis "
        "for this long (Redis lost it); at once after Redis restarts (default %(default)s)",
    )
    sampling = parser.add_argument_group("default sampling params (each line's own override)")
    sampling.add_argument("--max-tokens", type=int, default=None)
    sampling.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    sampling.add_argument("--top-p", type=float, default=None)
    local = parser.add_argument_group("local worker (only without --redis-url)")
    add_arguments(local, _LOCAL_WORKER_OPTIONS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError
    from tqdm.contrib.logging import logging_redirect_tqdm

    from producer.bulk import BulkConfig, BulkError, run_bulk
    from worker.embedded import EmbeddedRedisError
    from worker.errors import RequestError
    from worker.params import SamplingParams
    from worker.service.run import run_event_loop

    if not args.input.is_file():
        print(f"error: no input file {args.input}", file=sys.stderr)
        return 2
    defaults = {
        name: value
        for name in ("max_tokens", "temperature", "top_p")
        if (value := getattr(args, name)) is not None
    }
    try:
        SamplingParams.from_dict(defaults)
        config = BulkConfig(
            input_path=args.input,
            output_path=args.output,
            redis_url=args.redis_url or None,
            namespace=args.namespace,
            window=args.window,
            input_format=args.format,
            defaults=defaults,
            priority=args.priority,
            worker_flags=local_worker_flags(args),
            progress=not args.no_progress,
            watch=WatchConfig(lost_after_s=args.lost_after),
        )
    except (RequestError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with logging_redirect_tqdm():
            summary = run_event_loop(run_bulk(config))
    except (BulkError, EmbeddedRedisError, RedisError, OSError) as exc:
        # Finished lines are already in the output: a rerun resumes after fixing the cause.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"bulk: {summary.describe()}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED if summary.interrupted else 0


def local_worker_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The given local-worker flags, as `headrace worker` arguments."""
    given = {opt.dest: getattr(args, opt.dest, None) for opt in _LOCAL_WORKER_OPTIONS}
    return as_flags(given, _LOCAL_WORKER_OPTIONS)
