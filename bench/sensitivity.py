"""`headrace eval --weight-noise`: how far a model's predictions move under random weight
error, the yardstick for what any weight quantization of it can reach.

Each level adds Gaussian noise to every projection weight (the four that quantization
touches), with a standard deviation of `level` times the weight's own per-output-row
standard deviation, then scores the text like any configuration (`bench.eval`). A 4-bit
grid in groups of 128 leaves ~10% relative weight error, 8-bit per channel ~1%: if the
model misses a target already at a smaller noise level, no rounding scheme of that size
meets it, only a finer layout (smaller groups, more bits) does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from bench.eval import REFERENCE, EvalResult, compare, engine_config, score_segments, segments_of
from worker.models.quantized import quantizable_linears


def noise_name(level: float) -> str:
    return f"noise-{100 * level:g}%"


@torch.inference_mode()
def perturb_projections(model: Any, level: float, seed: int) -> dict[str, torch.Tensor]:
    """Add noise to every projection weight of `model` in place; → the originals, by name."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    originals = {}
    for name, linear in quantizable_linears(model):
        weight = linear.weight
        originals[name] = weight.detach().clone()
        noise = torch.randn(weight.shape, generator=gen).to(weight.device, torch.float32)
        row_std = weight.float().std(dim=1, keepdim=True)
        weight.copy_((weight.float() + noise * row_std * level).to(weight.dtype))
    return originals


@torch.inference_mode()
def restore_projections(model: Any, originals: dict[str, torch.Tensor]) -> None:
    for name, linear in quantizable_linears(model):
        linear.weight.copy_(originals[name])


def weight_noise(
    model: str,
    dtype: str,
    levels: Sequence[float],
    text: str,
    *,
    chunk_size: int = 64,
    max_segment_tokens: int = 512,
    threads: int | None = None,
    seed: int = 0,
) -> Iterator[EvalResult]:
    """Score `text` with the unquantized model, then once per noise level (the same engine,
    its weights perturbed and restored); yield each level's EvalResult (no target)."""
    from worker.engine.engine import Engine

    if any(level <= 0 for level in levels):
        raise ValueError("noise levels must be > 0")
    engine = Engine(engine_config(model, dtype, REFERENCE, max_segment_tokens, threads))
    segments = segments_of(engine, text, max_segment_tokens)
    ref = score_segments(engine, segments, chunk_size)
    net = engine.runner.model
    for level in levels:
        originals = perturb_projections(net, level, seed)
        try:
            scores = score_segments(engine, segments, chunk_size)
        finally:
            restore_projections(net, originals)
        yield compare(noise_name(level), scores, ref)
