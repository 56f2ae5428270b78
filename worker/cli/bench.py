"""The `headrace bench` verb: the throughput, e2e, linear and queue benchmarks.

`throughput`: our engine vs transformers; `e2e`: through Redis vs the engine alone;
`linear`: the projections' GEMMs; `queue`: the queue layer alone (a test engine, no model).

NOTE: ~350 lines: each sub-benchmark's flags and its few lines of glue, side by side.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from worker.cli.options import (
    ENGINE_OPTIONS,
    add_engine_args,
    apply_defaults,
    as_flags,
    engine_config_from_args,
)
from worker.config import DEFAULT_MODEL, DTYPES

if TYPE_CHECKING:
    from bench.throughput import RunResult
    from bench.workloads import Workload
    from worker.config import EngineConfig
    from worker.engine.engine import Engine

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks", description=__doc__.splitlines()[0])
    benches = parser.add_subparsers(dest="bench", required=True)
    tp = benches.add_parser(
        "throughput",
        help="output tokens/s of our engine and of transformers generate, same workload",
        description="Output tokens/s of our engine and of transformers `generate` (static "
        "left-padded batches) on the same requests and dtype, plus our TTFT/TPOT.",
    )
    add_engine_args(tp)
    tp.add_argument(
        "--workload",
        choices=("mixed", "uniform", "single", "shared-prefix", "bimodal"),
        default="mixed",
        help="single: one request of P prompt / O output tokens; shared-prefix: requests that "
        "share a --prefix-len prefix, each with its own --suffix-range suffix (also runs "
        "with prefix caching off: --compare-prefix-caching); bimodal: half the requests stop "
        "after ~16 tokens by a stop token (the one the model greedily emits there, found by "
        "an untimed pass), half run to 256, all with max_tokens 256",
    )
    tp.add_argument(
        "--num-requests",
        type=int,
        default=64,
        help="mixed/shared-prefix/bimodal: number of requests",
    )
    tp.add_argument("--prompt-len", type=int, default=128, help="uniform/single: prompt tokens (P)")
    # None: 128 (uniform/single), 64 (shared-prefix: the workload, prefill-bound).
    tp.add_argument(
        "--output-len",
        type=int,
        default=None,
        help="uniform/single/shared-prefix: output tokens (O); default 128, shared-prefix 64",
    )
    tp.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: common tokens")
    tp.add_argument(
        "--suffix-range",
        type=int,
        nargs=2,
        default=(32, 128),
        metavar=("LOW", "HIGH"),
        help="shared-prefix: each request's own tokens after the prefix (uniform, inclusive)",
    )
    tp.add_argument(
        "--compare-prefix-caching",
        action="store_true",
        help="also run our engine with prefix caching off, same process, and print the ratios "
        "(always on for shared-prefix)",
    )
    tp.add_argument(
        "--compare-admission",
        action="store_true",
        help="run our engine with fcfs, then predicted-length admission, same process and "
        "workload; print both (preemptions, recomputed tokens, tok/s), the ratios, and whether "
        "greedy outputs are identical (set the KV budget with --num-kv-blocks)",
    )
    tp.add_argument(
        "--warmup-requests",
        type=int,
        default=None,
        help="predicted admission: requests of an untimed warm-up workload (same kind, seed "
        "+ 1; with --workload-file, that workload) served first so the length predictor has "
        "samples (default: --num-requests; 0: none)",
    )
    tp.add_argument("--batch", type=int, default=16, help="uniform: number of requests (B)")
    tp.add_argument(
        "--dump-workload",
        metavar="FILE",
        help="write the workload (prompt token ids, output lengths) as JSON, for other engines",
    )
    tp.add_argument(
        "--workload-file", metavar="FILE", help="run a workload written by --dump-workload"
    )
    tp.add_argument("--baseline-batch-size", type=int, default=16)
    tp.add_argument("--no-baseline", action="store_true", help="skip transformers generate")
    tp.add_argument("--json", action="store_true", help="print one JSON object")
    tp.set_defaults(func=run_throughput)

    e2e = benches.add_parser(
        "e2e",
        help="producer → Redis → worker → results vs the engine alone, same run",
        description="Throughput through Redis against the engine alone on the mixed workload, "
        "in the same process, and TTFT including queueing.",
    )
    add_engine_args(e2e)
    e2e.add_argument("--num-requests", type=int, default=64)
    e2e.add_argument("--json", action="store_true", help="print one JSON object")
    e2e.set_defaults(func=run_e2e_bench)
    lin = benches.add_parser(
        "linear",
        help="W8A8 and W4A16 linear layers vs the unquantized one, at the model's shapes",
        description="Time each decoder projection (qkv, o, gate_up, down) of the model at "
        "several token counts: unquantized (the engine's GEMM path), W8A8 (per-token "
        "quantization + int8 GEMM) and W4A16, on the engine's device.",
    )
    lin.add_argument("--model", default=DEFAULT_MODEL, help="its config gives the shapes")
    lin.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    lin.add_argument("--tokens", default="1,16,128,512", help="comma-separated M values")
    lin.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    lin.add_argument("--json", action="store_true", help="one JSON object per line")
    lin.set_defaults(func=run_linear)
    queue = benches.add_parser(
        "queue",
        help="the queue layer's own cost: Redis commands/job, jobs/s, p99 latency, no model",
        description="producer → Redis → worker → result with a test engine that returns "
        "--tokens tokens at once (no model): Redis commands per job, jobs/s and the latency "
        "the queue adds, on one node and on a local 3-primary cluster, per worker count.",
    )
    queue.add_argument("--jobs", type=int, default=2000, help="jobs per measured run")
    queue.add_argument("--tokens", type=int, default=16, help="output tokens per job")
    queue.add_argument("--concurrency", type=int, default=64, help="jobs in flight")
    queue.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    queue.add_argument("--deployments", default="single,cluster", help="single and/or cluster")
    queue.add_argument("--shards", type=int, default=3, help="request-stream shards (cluster)")
    queue.add_argument("--json", action="store_true", help="print one JSON object")
    queue.set_defaults(func=run_queue)


def run_queue(args: argparse.Namespace) -> int:
    from bench.queue import QueueBenchConfig, as_dicts, render, run_queue_bench

    config = QueueBenchConfig(
        jobs=args.jobs,
        tokens=args.tokens,
        concurrency=args.concurrency,
        workers=tuple(int(n) for n in args.workers.split(",")),
        deployments=tuple(args.deployments.split(",")),
        shards=args.shards,
    )
    runs = run_queue_bench(config)
    print(json.dumps(as_dicts(runs)) if args.json else render(runs, config), flush=True)
    return 0


def run_linear(args: argparse.Namespace) -> int:
    import torch

    from bench.linear import bench_linear, format_table, projection_shapes
    from ops.device import default_device
    from worker.models.llama import ModelArgs
    from worker.models.loader import load_hf_config
    from worker.models.source import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model_args = ModelArgs.from_hf_config(load_hf_config(resolve_model(args.model)))
    tokens = [int(t) for t in args.tokens.split(",")]
    device = default_device()
    results = bench_linear(
        projection_shapes(model_args), tokens, getattr(torch, args.dtype), device
    )
    if args.json:
        for r in results:
            print(json.dumps(r.to_dict()))
    else:
        print(f"{args.model} projections on {device} ({torch.get_num_threads()} threads)\n")
        print(format_table(results))
    return 0


def run_e2e_bench(args: argparse.Namespace) -> int:
    from bench.e2e import run_e2e
    from bench.workloads import mixed_workload, sampleable_token_ids
    from worker.engine.engine import Engine

    apply_defaults(args)  # passed on to the worker as they are
    engine = Engine(engine_config_from_args(args))
    vocab = sampleable_token_ids(engine.tokenizer, engine.vocab_size)
    workload = mixed_workload(vocab, num_requests=args.num_requests, seed=args.seed)
    engine.warm_up()
    worker_args = list(as_flags(vars(args), ENGINE_OPTIONS))
    report = run_e2e(engine, worker_args, workload)
    if args.json:
        print(json.dumps(report.to_dict()), flush=True)
        return 0
    for name, run in (("engine alone", report.engine_alone), ("via Redis", report.via_redis)):
        d = run.to_dict()
        print(
            f"{name:13s} {run.tokens_per_s:8.1f} tok/s  TTFT p50/p99 "
            f"{d['ttft_p50_s']:.2f}/{d['ttft_p99_s']:.2f} s  TPOT p50/p99 "
            f"{d['tpot_p50_s'] * 1000:.0f}/{d['tpot_p99_s'] * 1000:.0f} ms"
        )
    print(
        f"overhead {report.overhead * 100:+.1f}% of throughput; queue wait p50 {report.queued_ms_p50:.0f} ms"
    )
    return 0


def run_throughput(args: argparse.Namespace) -> int:
    import torch

    from bench import admission, throughput
    from bench.workloads import Workload, sampleable_token_ids
    from worker.engine.engine import Engine
    from worker.models.source import resolve_model

    # Both engines get the same threads: set here, and passed to the engine's config.
    apply_defaults(args)  # reported as they are
    num_threads = args.num_threads or torch.get_num_threads()
    torch.set_num_threads(num_threads)
    args.num_threads = num_threads
    config = engine_config_from_args(args)
    engine = Engine(config)
    vocab = sampleable_token_ids(engine.tokenizer, engine.vocab_size)
    if args.workload_file:
        workload = Workload.load(args.workload_file, engine.vocab_size)
    else:
        workload = _workload(args, vocab, args.num_requests, args.seed)
    warmup = None
    if args.compare_admission or config.scheduler.admission == "predicted":
        # A worker's predictor learns from what it served; here, a workload like this one.
        num_warm = args.num_requests if args.warmup_requests is None else args.warmup_requests
        warmup = _workload(args, vocab, num_warm, args.seed + 1) if num_warm > 0 else None
        if args.workload_file and warmup is not None:  # the file's own requests, cycled
            again = tuple(itertools.islice(itertools.cycle(workload.requests), num_warm))
            warmup = Workload(f"{num_warm} requests of {workload.name}", again)
        warmup = admission.calibrate_stops(engine, warmup) if warmup else None
    workload = admission.calibrate_stops(engine, workload)
    if args.dump_workload:
        workload.dump(args.dump_workload)
    warm_prompt = tuple(vocab[:8])
    pad_token_id = _pad_token_id(engine)
    kv_blocks = engine.allocator.num_blocks
    device = engine.device
    kernels = engine.runner.kernel_paths

    comparison = None
    # A fresh engine for each policy, and after calibrating stops (its prefix cache holds them).
    fresh = args.compare_admission or any(r.stop_token_ids for r in workload.requests)
    if fresh:
        del engine
        gc.collect()
    if args.compare_admission:
        if warmup is None:
            warmup = Workload("no warm-up", ())
        comparison = admission.compare(config, workload, warmup, _run_engine)
        ours = comparison.predicted
    elif fresh:
        ours = _run_engine(config, workload, warmup)
    else:
        log.info("headrace (%s): %s", _config_label(config), workload.name)
        engine.warm_up()
        if warmup is not None:
            throughput.run_engine(engine, warmup)  # untimed: the predictor's samples
        ours = throughput.run_engine(engine, workload)
        del engine  # frees the KV cache before the next engine or the baseline loads
        gc.collect()

    no_prefix_cache = None
    compare = args.compare_prefix_caching or args.workload == "shared-prefix"
    if compare and config.cache.enable_prefix_caching:
        off = replace(config, cache=replace(config.cache, enable_prefix_caching=False))
        log.info("headrace (no prefix cache): %s", workload.name)
        no_prefix_cache = _run_engine(off, workload, warmup)

    reference = None
    if _config_label(config) != "unquantized":
        # Quantized configurations are also measured against the unquantized engine.
        plain = replace(
            config,
            model=replace(config.model, quantization="none"),
            cache=replace(config.cache, dtype="auto"),
        )
        log.info("headrace (unquantized): %s", workload.name)
        reference = _run_engine(plain, workload, warmup)

    baseline = None
    if not args.no_baseline:
        log.info("transformers generate: %s", workload.name)
        model = throughput.load_transformers(resolve_model(args.model), args.dtype, device)
        throughput.warm_up_transformers(model, warm_prompt, pad_token_id)
        baseline = throughput.run_transformers(
            model, workload, pad_token_id, batch_size=args.baseline_batch_size
        )

    report = throughput.BenchReport(
        workload=workload.name,
        model=args.model,
        dtype=args.dtype,
        config=_config_label(config),
        num_threads=num_threads,
        num_requests=len(workload.requests),
        prompt_tokens=workload.num_prompt_tokens,
        baseline_batch_size=args.baseline_batch_size,
        headrace=ours,
        transformers=baseline,
        unquantized=reference,
        no_prefix_cache=no_prefix_cache,
        kernels=kernels,
        admission="predicted" if comparison else config.scheduler.admission,
        kv_blocks=kv_blocks,
        peak_kv_blocks=workload.peak_kv_blocks(config.cache.block_size),
        compare_admission=comparison,
    )
    print(json.dumps(report.to_dict()) if args.json else report.format_table(), flush=True)
    return 0


def _workload(args: argparse.Namespace, vocab: list[int], num_requests: int, seed: int) -> Workload:
    """The --workload kind, of `num_requests` (mixed, shared-prefix, bimodal) and `seed`."""
    from bench import workloads

    if args.workload == "mixed":
        return workloads.mixed_workload(vocab, num_requests=num_requests, seed=seed)
    if args.workload == "bimodal":
        return workloads.bimodal_workload(vocab, num_requests=num_requests, seed=seed)
    if args.workload == "shared-prefix":
        return workloads.shared_prefix_workload(
            vocab,
            num_requests,
            args.prefix_len,
            tuple(args.suffix_range),
            64 if args.output_len is None else args.output_len,
            seed=seed,
        )
    batch = 1 if args.workload == "single" else args.batch
    output_len = 128 if args.output_len is None else args.output_len
    return workloads.uniform_workload(vocab, args.prompt_len, output_len, batch, seed=seed)


def _run_engine(
    config: EngineConfig, workload: Workload, warmup: Workload | None = None
) -> RunResult:
    """A fresh engine of `config`, warmed up (and, given `warmup`, served that untimed
    first), then timed on `workload`, then freed."""
    from bench import throughput
    from worker.engine.engine import Engine

    engine = Engine(config)
    log.info("headrace (%s, %s admission): %s", _config_label(config),
             config.scheduler.admission, workload.name)  # fmt: skip
    engine.warm_up()
    if warmup is not None and warmup.requests:
        throughput.run_engine(engine, warmup)
    result = throughput.run_engine(engine, workload)
    del engine
    gc.collect()
    return result


def _config_label(config: EngineConfig) -> str:
    """ "unquantized", or the quantized parts: "int8-kv", "w8a8", "w8a8+int8-kv", ..."""
    parts = [config.model.quantization] if config.model.quantization != "none" else []
    parts += ["int8-kv"] if config.cache.dtype == "int8" else []
    return "+".join(parts) or "unquantized"


def _pad_token_id(engine: Engine) -> int:
    # Padded positions are masked out, so any id works; the tokenizer's own pad is tidiest.
    tokenizer = engine.tokenizer
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return min(engine.eos_token_ids)
