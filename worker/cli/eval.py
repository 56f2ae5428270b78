"""The `headrace eval` verb: the accuracy cost of quantization (`bench.eval`), and of weight
noise (`bench.sensitivity`), against the unquantized model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from worker.config import DEFAULT_MODEL, DTYPES

# `bench.eval.CONFIGS`, named here so that `headrace --help` imports no torch.
EVAL_CONFIGS = ("int8-kv", "w8a8", "w8a8+int8-kv", "w4a16", "w4a16-g32")


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser(
        "eval",
        help="accuracy cost of quantization: top-1 agreement and perplexity vs the unquantized model",
        description="Teacher-forced top-1 agreement and perplexity of each quantized "
        "configuration against the unquantized model on a text (default: public-domain "
        "English and Chinese, bench/data/eval_en_zh.txt).",
    )
    ev.add_argument("--text", default=None, help="UTF-8 text file; paragraphs split by blank lines")
    ev.add_argument("--json", action="store_true", help="one JSON object per line per config")
    ev.add_argument(
        "--configs",
        nargs="+",
        choices=(*EVAL_CONFIGS, "reference"),
        default=list(EVAL_CONFIGS),
        metavar="CONFIG",
        help=f"subset of {', '.join(EVAL_CONFIGS)} (default: all); 'reference' rescores the unquantized model (the noise floor)",
    )
    ev.add_argument("--model", default=DEFAULT_MODEL, help="directory, hub id, .gguf or smollm2")
    ev.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="of the reference and every configuration alike; float32 (default) keeps bf16 "
        "rounding out of the difference, so it measures the quantization alone",
    )
    ev.add_argument(
        "--chunk-size",
        type=int,
        default=64,
        help="prefill chunk: tokens after the first chunk read the (int8: quantized) KV cache",
    )
    ev.add_argument(
        "--max-segment-tokens",
        type=int,
        default=512,
        help="same-language paragraphs are packed into segments scored from a fresh cache",
    )
    ev.add_argument(
        "--weight-noise",
        type=float,
        nargs="+",
        default=[],
        metavar="LEVEL",
        help="also score the unquantized model with Gaussian noise of LEVEL x each projection "
        "row's std added to its weights (e.g. 0.01 0.025 0.1): the model's sensitivity",
    )
    ev.add_argument("--num-threads", "--threads", dest="threads", type=int, default=None)
    ev.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    ev.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from bench import eval as quant_eval

    if args.text is None:
        args.text = str(quant_eval.DEFAULT_TEXT)
    if any(level <= 0 for level in args.weight_noise):
        print("headrace eval: --weight-noise levels must be > 0", file=sys.stderr)
        return 2
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Print the table (or JSON lines); with --check, 1 if a target is missed."""
    from bench import eval as quant_eval
    from bench.sensitivity import weight_noise

    text = Path(args.text).read_text(encoding="utf-8")
    sizes = {"chunk_size": args.chunk_size, "max_segment_tokens": args.max_segment_tokens}
    results = []
    runs = [
        quant_eval.evaluate(
            args.model, args.dtype, args.configs, text, **sizes, threads=args.threads
        )
    ]
    if args.weight_noise:
        levels = args.weight_noise
        runs.append(
            weight_noise(args.model, args.dtype, levels, text, **sizes, threads=args.threads)
        )
    for result in (r for run in runs for r in run):
        results.append(result)
        if args.json:
            print(json.dumps(result.to_dict(), ensure_ascii=False), flush=True)
    if not args.json:
        header = f"{args.model}, {args.dtype}, {Path(args.text).name}, chunks of {args.chunk_size}"
        print(quant_eval.format_table(results, header), flush=True)
    return 1 if args.check and any(r.passed is False for r in results) else 0
