"""The `headrace` command line: one entry point, one module per verb.

Each verb module exposes `register(subparsers)` which adds its parser and sets
`func` (taking the parsed args, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Verb modules, imported lazily so `headrace --help` stays fast (no torch import).
VERB_MODULES: tuple[str, ...] = (
    "worker.generate_cli",
    "bench.cli",
    "producer.cli",
    "worker.service_cli",
    "producer.bulk_cli",
    "worker.stats_cli",
    "worker.quantize_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headrace", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    subparsers = parser.add_subparsers(dest="verb", required=True)
    for module_name in VERB_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
