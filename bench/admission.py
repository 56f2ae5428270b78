"""`headrace bench throughput --compare-admission`: fcfs against predicted-length admission.

Both policies run in one process on the same workload, each on a fresh engine of the same
config, and each first serves an untimed warm-up workload (the same for both) so that the
length predictor has seen finished requests, as in a worker that has been running a while.
Reported: output tok/s, preemptions and recomputed tokens of each, their ratios, and whether
every request's greedy output is identical under both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from bench.throughput import RunResult, bench_params
from bench.workloads import Workload
from worker.engine.sequence import Request

if TYPE_CHECKING:
    from worker.config import EngineConfig
    from worker.engine.engine import Engine

# (engine config, timed workload, untimed warm-up workload or None) → the timed run.
RunEngine = Callable[["EngineConfig", Workload, "Workload | None"], RunResult]


@dataclass(frozen=True)
class AdmissionComparison:
    """fcfs and predicted admission on the same workload; `warmup`: the untimed workload
    each engine served first (its name), so that the predictor had samples."""

    fcfs: RunResult
    predicted: RunResult
    warmup: str

    @property
    def tokens_per_s_ratio(self) -> float | None:
        """predicted / fcfs output tok/s."""
        base = self.fcfs.tokens_per_s
        return self.predicted.tokens_per_s / base if base else None

    @property
    def recompute_reduction(self) -> float | None:
        """fcfs / predicted recomputed tokens (how many times fewer); None when predicted
        recomputed nothing (then any fcfs recompute is an unbounded reduction)."""
        fcfs, predicted = self.fcfs.num_recomputed_tokens, self.predicted.num_recomputed_tokens
        return fcfs / predicted if fcfs is not None and predicted else None

    @property
    def outputs_identical(self) -> bool:
        return self.fcfs.token_ids == self.predicted.token_ids

    def to_dict(self) -> dict:
        return {
            "fcfs": self.fcfs.to_dict(),
            "predicted": self.predicted.to_dict(),
            "warmup": self.warmup,
            "tokens_per_s_ratio": self.tokens_per_s_ratio,
            "recompute_reduction": self.recompute_reduction,
            "outputs_identical": self.outputs_identical,
        }

    def format_lines(self) -> list[str]:
        ratio = self.tokens_per_s_ratio
        reduction = self.recompute_reduction
        fcfs, predicted = self.fcfs.num_recomputed_tokens, self.predicted.num_recomputed_tokens
        if reduction is not None:
            fewer = f"{reduction:.1f}x fewer"
        else:
            fewer = "none with predicted" if fcfs else "none either way"
        return [
            f"admission: each engine first served {self.warmup}, untimed (predictor warm-up)",
            f"predicted / fcfs output tok/s    {ratio:.2f}x" if ratio else "",
            f"recomputed tokens fcfs {fcfs} / predicted {predicted}: {fewer}",
            f"greedy outputs identical         {'yes' if self.outputs_identical else 'NO'}",
        ]


def compare(
    config: EngineConfig, workload: Workload, warmup: Workload, run: RunEngine
) -> AdmissionComparison:
    """Run `workload` with fcfs, then with predicted admission (fresh engines, same config)."""
    runs = {
        policy: run(replace(config, scheduler=replace(config.scheduler, admission=policy)),
                    workload, warmup)
        for policy in ("fcfs", "predicted")
    }  # fmt: skip
    return AdmissionComparison(runs["fcfs"], runs["predicted"], warmup.name)


def calibrate_stops(engine: Engine, workload: Workload) -> Workload:
    """Give each request that `needs_stop` the token the model greedily emits at its
    `output_len`, as its stop token, so it stops there (or earlier, where that token first
    comes up: its output_len is set to that). One untimed greedy pass of those requests."""
    todo = [i for i, r in enumerate(workload.requests) if r.needs_stop]
    if not todo:
        return workload
    requests = [
        Request(f"calibrate-{i}", r.prompt_token_ids, bench_params(replace(r, max_tokens=None)))
        for i in todo
        for r in (workload.requests[i],)
    ]
    changed = list(workload.requests)
    for i, completion in zip(todo, engine.generate(requests), strict=True):
        ids = list(completion.token_ids)
        stop = ids[-1]
        changed[i] = replace(changed[i], output_len=ids.index(stop) + 1, stop_token_ids=(stop,))
    return replace(workload, requests=tuple(changed))
