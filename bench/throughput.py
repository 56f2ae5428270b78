"""Throughput benchmark: our engine vs transformers `generate` on the same workload and dtype.

Our engine is driven step by step so each request's first and last token can be
timestamped (TTFT, TPOT); the baseline runs static left-padded batches, greedy, every
row generating the batch's longest output, of which only each request's own output
length counts as useful.

NOTE: ~320 lines: the two drivers (ours, transformers') and the report they fill.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from bench.workloads import BenchRequest, Workload
from worker.engine.sequence import Request
from worker.params import SamplingParams

if TYPE_CHECKING:
    from bench.admission import AdmissionComparison
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
    # Our engine: sequences preempted for lack of KV pages, and the tokens prefilled again.
    num_preemptions: int | None = None
    num_recomputed_tokens: int | None = None
    # Our engine: each request's output tokens, in workload order (to compare two runs).
    token_ids: tuple[tuple[int, ...], ...] = field(default=(), repr=False, compare=False)

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
        if self.num_preemptions is not None:
            out["preemptions"] = self.num_preemptions
            out["recomputed_tokens"] = self.num_recomputed_tokens
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
    admission: str = "fcfs"  # the policy of the `headrace` run
    kv_blocks: int | None = None  # KV pool of our engine, in pages
    peak_kv_blocks: int | None = None  # what the whole workload needs at once (no preemption)
    compare_admission: AdmissionComparison | None = None  # fcfs vs predicted, same run

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
        skip = (*runs, "compare_admission")
        out: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in skip}
        comparison = self.compare_admission
        out["compare_admission"] = None if comparison is None else comparison.to_dict()
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
            f"admission  {self.admission}{self._kv_line()}",
            "",
            f"{'':28}{'output tok/s':>14}{'requests/s':>12}{'output tokens':>15}{'elapsed s':>11}"
            f"{'preempted':>11}{'recomputed':>12}",
            _row(f"headrace ({self.config})", ours),
        ]
        if self.compare_admission is not None:
            rows[-1] = _row("headrace (predicted)", self.compare_admission.predicted)
            rows.append(_row("headrace (fcfs)", self.compare_admission.fcfs))
        if self.unquantized is not None:
            rows.append(_row("headrace (unquantized)", self.unquantized))
            rows.append(f"{'ratio vs unquantized':28}{self.ratio_vs_unquantized:>13.2f}x")
        if self.no_prefix_cache is not None:
            rows.append(_row("headrace (no prefix cache)", self.no_prefix_cache))
            rows.append(f"{'ratio vs no prefix cache':28}{self.ratio_vs_no_prefix_cache:>13.2f}x")
        if base is not None:
            rows.append(_row(f"transformers (batch {self.baseline_batch_size})", base))
            rows.append(f"{'ratio':28}{self.ratio:>13.2f}x")
        if self.compare_admission is not None:
            rows += [""] + [line for line in self.compare_admission.format_lines() if line]
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

    def _kv_line(self) -> str:
        if self.kv_blocks is None or not self.peak_kv_blocks:
            return ""
        share = 100 * self.kv_blocks / self.peak_kv_blocks
        return f"; KV {self.kv_blocks} pages, {share:.0f}% of the workload's {self.peak_kv_blocks}"


def run_engine(engine: Engine, workload: Workload) -> RunResult:
    """Greedy, ignore_eos, all requests queued at t=0; the engine schedules them as it likes.

    TTFT: t=0 → the request's first token. TPOT: (last − first token) / (tokens − 1).
    """
    requests = [
        Request(f"bench-{i}", r.prompt_token_ids, bench_params(r))
        for i, r in enumerate(workload.requests)
    ]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
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
                tokens[out.request_id] += out.new_token_ids
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
                progress.update(len(out.new_token_ids))
    elapsed = time.perf_counter() - start
    progress.close()
    counts = {rid: len(ids) for rid, ids in tokens.items()}
    ttft = tuple(t - start for t in first.values())
    tpot = tuple((last[rid] - first[rid]) / (counts[rid] - 1) for rid in first if counts[rid] > 1)
    after = engine.stats()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = (after.prefix_cache_hits - before.prefix_cache_hits) / queries if queries else None
    return RunResult(
        sum(counts.values()),
        elapsed,
        ttft,
        tpot,
        len(requests),
        hits,
        num_preemptions=after.num_preemptions - before.num_preemptions,
        num_recomputed_tokens=after.num_recomputed_tokens - before.num_recomputed_tokens,
        token_ids=tuple(tuple(ids) for ids in tokens.values()),
    )


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


def bench_params(r: BenchRequest) -> SamplingParams:
    """Greedy, EOS ignored: a request ends at its max_tokens or at one of its stop tokens."""
    return SamplingParams(
        max_tokens=r.max_tokens or r.output_len,
        temperature=0.0,
        ignore_eos=True,
        stop_token_ids=r.stop_token_ids,
    )


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
    row = (
        f"{name:28}{result.tokens_per_s:>14.1f}{result.requests_per_s:>12.2f}"
        f"{result.output_tokens:>15}{result.elapsed_s:>11.2f}"
    )
    if result.num_preemptions is not None:  # our engine: what KV pressure cost
        row += f"{result.num_preemptions:>11}{result.num_recomputed_tokens:>12}"
    return row
