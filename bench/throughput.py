"""Throughput benchmark: our engine vs transformers `generate` on the same workload and dtype.

Our engine is driven step by step so each request's first and last token can be
timestamped (TTFT, TPOT); the baseline runs static left-padded batches, greedy, every
row generating the batch's longest output, of which only each request's own output
length counts as useful.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from bench.workloads import BenchRequest, Workload
from worker.engine.params import SamplingParams
from worker.engine.sequence import Request

if TYPE_CHECKING:
    from worker.engine.engine import Engine


@dataclass(frozen=True)
class RunResult:
    """One engine's timed pass over a workload. Latencies are per request, in seconds."""

    output_tokens: int
    elapsed_s: float
    ttft_s: tuple[float, ...] = ()
    tpot_s: tuple[float, ...] = ()
    num_requests: int = 0
    prefix_cache_hit_ratio: float | None = None  # our engine: prompt tokens served from cache

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, float | int | None]:
        out: dict[str, float | int | None] = {
            "output_tokens": self.output_tokens,
            "elapsed_s": self.elapsed_s,
            "output_tokens_per_s": self.tokens_per_s,
            "requests_per_s": self.requests_per_s,
        }
        if self.prefix_cache_hit_ratio is not None:
            out["prefix_cache_hit_ratio"] = self.prefix_cache_hit_ratio
        for name, values in (("ttft", self.ttft_s), ("tpot", self.tpot_s)):
            if values:  # only our engine is timed per request
                for q in (50, 99):
                    out[f"{name}_p{q}_s"] = _percentile(values, q)
        return out


@dataclass(frozen=True)
class BenchReport:
    workload: str
    model: str
    dtype: str
    config: str  # "unquantized", or e.g. "w8a8+int8-kv"
    num_threads: int
    num_requests: int
    prompt_tokens: int
    baseline_batch_size: int
    headrace: RunResult
    transformers: RunResult | None
    unquantized: RunResult | None = None  # our engine without quantization, same run
    no_prefix_cache: RunResult | None = None  # our engine with prefix caching off, same run
    kernels: dict[str, str] | None = None  # `ops.device.kernel_paths`: CPU flags, kernels

    @property
    def ratio(self) -> float | None:
        return _ratio(self.headrace, self.transformers)

    @property
    def ratio_vs_unquantized(self) -> float | None:
        return _ratio(self.headrace, self.unquantized)

    @property
    def ratio_vs_no_prefix_cache(self) -> float | None:
        return _ratio(self.headrace, self.no_prefix_cache)

    @property
    def ttft_p50_reduction(self) -> float | None:
        """TTFT p50 with prefix caching off / with it on (how many times lower it is on)."""
        if self.no_prefix_cache is None:
            return None
        on, off = (_percentile(r.ttft_s, 50) for r in (self.headrace, self.no_prefix_cache))
        return off / on if on and off is not None else None

    def to_dict(self) -> dict:
        runs = ("headrace", "transformers", "unquantized", "no_prefix_cache")
        out = {k: v for k, v in asdict(self).items() if k not in runs}
        for name in runs:
            run = getattr(self, name)
            out[name] = None if run is None else run.to_dict()
        out["ratio"] = self.ratio
        out["ratio_vs_unquantized"] = self.ratio_vs_unquantized
        out["ratio_vs_no_prefix_cache"] = self.ratio_vs_no_prefix_cache
        out["ttft_p50_reduction"] = self.ttft_p50_reduction
        return out

    def format_table(self) -> str:
        ours, base = self.headrace, self.transformers
        rows = [
            f"workload   {self.workload}: {self.num_requests} requests, "
            f"{self.prompt_tokens} prompt tokens",
            f"model      {self.model} ({self.dtype}, {self.config}, {self.num_threads} threads)",
            "",
            f"{'':28}{'output tok/s':>14}{'requests/s':>12}{'output tokens':>15}{'elapsed s':>11}",
            _row(f"headrace ({self.config})", ours),
        ]
        if self.unquantized is not None:
            rows.append(_row("headrace (unquantized)", self.unquantized))
            rows.append(f"{'ratio vs unquantized':28}{self.ratio_vs_unquantized:>13.2f}x")
        if self.no_prefix_cache is not None:
            rows.append(_row("headrace (no prefix cache)", self.no_prefix_cache))
            rows.append(f"{'ratio vs no prefix cache':28}{self.ratio_vs_no_prefix_cache:>13.2f}x")
        if base is not None:
            rows.append(_row(f"transformers (batch {self.baseline_batch_size})", base))
            rows.append(f"{'ratio':28}{self.ratio:>13.2f}x")
        if self.kernels:
            rows += [""] + [f"{name:11}{path}" for name, path in self.kernels.items()]
        ttft = f"{_latency(ours.ttft_s, 50)} / {_latency(ours.ttft_s, 99)}"
        tpot = f"{_latency(ours.tpot_s, 50)} / {_latency(ours.tpot_s, 99)}"
        rows += ["", f"headrace TTFT p50 / p99    {ttft}", f"headrace TPOT p50 / p99    {tpot}"]
        if ours.prefix_cache_hit_ratio is not None:
            hits = 100 * ours.prefix_cache_hit_ratio
            rows.append(f"prefix cache hits          {hits:.1f}% of prompt tokens")
        off = self.no_prefix_cache
        if off is not None:
            ttft = f"{_latency(off.ttft_s, 50)} / {_latency(off.ttft_s, 99)}"
            reduction = self.ttft_p50_reduction
            rows.append(f"no prefix cache: TTFT p50 / p99 {ttft}")
            if reduction is not None:
                rows.append(f"TTFT p50 {reduction:.2f}x lower with the prefix cache")
        return "\n".join(rows)


def run_engine(engine: Engine, workload: Workload) -> RunResult:
    """Greedy, ignore_eos, all requests queued at t=0; the engine schedules them as it likes.

    TTFT: t=0 → the request's first token. TPOT: (last − first token) / (tokens − 1).
    """
    requests = [
        Request(f"bench-{i}", r.prompt_token_ids, _bench_params(r.output_len))
        for i, r in enumerate(workload.requests)
    ]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    counts = dict.fromkeys((r.request_id for r in requests), 0)
    progress = tqdm(total=workload.num_output_tokens, desc="headrace", unit="tok", leave=False)
    before = engine.stats()
    start = time.perf_counter()
    for request in requests:
        engine.add_request(request)
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.new_token_ids:
                counts[out.request_id] += len(out.new_token_ids)
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
                progress.update(len(out.new_token_ids))
    elapsed = time.perf_counter() - start
    progress.close()
    ttft = tuple(t - start for t in first.values())
    tpot = tuple((last[rid] - first[rid]) / (counts[rid] - 1) for rid in first if counts[rid] > 1)
    after = engine.stats()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = (after.prefix_cache_hits - before.prefix_cache_hits) / queries if queries else None
    return RunResult(sum(counts.values()), elapsed, ttft, tpot, len(requests), hits)


def load_transformers(model_dir: Path, dtype: str, device: torch.device) -> torch.nn.Module:
    """The baseline on the engine's device (a GPU engine is compared with a GPU baseline)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def run_transformers(
    model: torch.nn.Module, workload: Workload, pad_token_id: int, batch_size: int = 16
) -> RunResult:
    """Static batches of `batch_size` in workload order; counts only requested tokens."""
    batches = [
        workload.requests[i : i + batch_size] for i in range(0, len(workload.requests), batch_size)
    ]
    start = time.perf_counter()
    useful = 0
    for batch in tqdm(batches, desc="transformers", unit="batch", leave=False):
        new_tokens = _generate_padded(model, batch, pad_token_id)
        useful += sum(min(r.output_len, new_tokens) for r in batch)
    return RunResult(useful, time.perf_counter() - start, num_requests=len(workload.requests))


def warm_up_transformers(model: torch.nn.Module, token_ids: tuple[int, ...], pad: int) -> None:
    _generate_padded(model, (BenchRequest(token_ids, 2),), pad)


def _generate_padded(
    model: torch.nn.Module, batch: Sequence[BenchRequest], pad_token_id: int
) -> int:
    """Left-pads `batch` into input_ids [B, max_prompt] (int64); returns new tokens per row."""
    from transformers import GenerationConfig

    width = max(len(r.prompt_token_ids) for r in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        n = len(r.prompt_token_ids)
        input_ids[row, width - n :] = torch.tensor(r.prompt_token_ids)
        attention_mask[row, width - n :] = 1
    max_new = max(r.output_len for r in batch)
    # min_new_tokens == max_new_tokens suppresses EOS: every row does the full work.
    config = GenerationConfig(
        max_new_tokens=max_new,
        min_new_tokens=max_new,
        do_sample=False,
        pad_token_id=pad_token_id,
        eos_token_id=model.generation_config.eos_token_id,
    )
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            generation_config=config,
        )
    return out.shape[1] - width


def _bench_params(output_len: int) -> SamplingParams:
    return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)


def _ratio(run: RunResult, base: RunResult | None) -> float | None:
    if base is None or base.tokens_per_s == 0:
        return None
    return run.tokens_per_s / base.tokens_per_s


def _percentile(values: tuple[float, ...], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _latency(values: tuple[float, ...], q: float) -> str:
    value = _percentile(values, q)
    if value is None:
        return "n/a"
    return f"{value * 1e3:.1f} ms" if value < 1.0 else f"{value:.2f} s"


def _row(name: str, result: RunResult) -> str:
    return (
        f"{name:28}{result.tokens_per_s:>14.1f}{result.requests_per_s:>12.2f}"
        f"{result.output_tokens:>15}{result.elapsed_s:>11.2f}"
    )
