"""CUDA-graph decode overhead: a replayed decode step's wall time over its kernels' GPU time.

    python -m bench.graph_overhead [--model DIR] [--batches 1 64] [--context 256] [--json]

For each batch size, the engine's `DecodeGraphs` runs a synthetic decode step (every
sequence `--context` tokens long, on pages of its own) `--iters` times: `wall_us` is the
step's time per call (filling the persistent buffers + replay, synchronized),
`kernels_us` the sum of the device activities (kernels, copies) the torch profiler records
for one step. The issue-11 target is `ratio = wall_us / kernels_us ≤ 1.3` at batch 1 and 64.
CPU-only machines exit with a message (graphs are CUDA-only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from worker.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from worker.engine.cuda_graphs import DecodeGraphs
from worker.engine.engine import Engine


def _step_inputs(
    batch: int, context: int, block_size: int
) -> tuple[list[int], list[int], list[int], list[list[int]], list[int]]:
    """A decode step of `batch` sequences, each `context` tokens long after it."""
    pages = -(-context // block_size)
    tables = [list(range(i * pages, (i + 1) * pages)) for i in range(batch)]
    pos = context - 1
    slots = [t[pos // block_size] * block_size + pos % block_size for t in tables]
    return [1] * batch, [pos] * batch, slots, tables, [context] * batch


def _kernel_us(graphs: DecodeGraphs, inputs: tuple, iters: int) -> float:
    """Device time per step: the profiler's CUDA activities, summed, over `iters` steps."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            graphs.run(*inputs)
        torch.cuda.synchronize()
    device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in device) / iters


def measure(graphs: DecodeGraphs, batch: int, context: int, iters: int) -> dict:
    inputs = _step_inputs(batch, context, graphs.block_size)
    for _ in range(5):
        graphs.run(*inputs)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        graphs.run(*inputs)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / iters * 1e6
    kernels = _kernel_us(graphs, inputs, min(iters, 20))
    return {
        "batch": batch,
        "bucket": graphs.bucket(batch),
        "context": context,
        "wall_us": round(wall, 1),
        "kernels_us": round(kernels, 1),
        "ratio": round(wall / kernels, 3) if kernels else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("HEADRACE_TEST_MODEL_DIR", "smollm2"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("graph_overhead: no CUDA device (CUDA graphs are CUDA-only)", file=sys.stderr)
        return 1
    max_batch = max(args.batches)
    engine = Engine(
        EngineConfig(
            model=ModelConfig(
                source=args.model, dtype=args.dtype, max_model_len=args.max_model_len
            ),
            cache=CacheConfig(num_blocks=max_batch * -(-args.context // 16) + 1, block_size=16),
            scheduler=SchedulerConfig(max_num_seqs=max_batch),
        )
    )
    graphs = engine.runner.decode_graphs
    if graphs is None:
        print("graph_overhead: the engine captured no graphs", file=sys.stderr)
        return 1
    with torch.inference_mode():
        for batch in args.batches:
            result = measure(graphs, batch, args.context, args.iters)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                print(
                    f"batch {batch:4d} (bucket {result['bucket']}): step {result['wall_us']} us, "
                    f"kernels {result['kernels_us']} us, ratio {result['ratio']} (target ≤ 1.3)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
