"""The `headrace worker` verb: serve jobs from a Redis stream (flags + HEADRACE_* env)."""

from __future__ import annotations

import argparse

from worker.cli.options import OPTIONS, add_arguments, worker_config_from_args
from worker.service.logs import use_log_format


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="serve generation jobs from a Redis stream",
        description=(
            "Read jobs from {namespace}:requests, run them in one continuous batch, publish "
            "results to each job's reply_to stream. Without --redis-url an embedded "
            "redis-server is started and its URL printed. SIGTERM/SIGINT drains and exits 0."
        ),
    )
    add_arguments(parser, OPTIONS)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    config = worker_config_from_args(args)
    use_log_format(config.log_format)
    from worker.service.run import run_worker  # torch import: only when the verb runs

    return run_worker(config)
