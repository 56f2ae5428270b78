"""Calibration statistics: a text fed through a float model so that forward hooks (SmoothQuant's
activation abs-max, GPTQ's input Hessians) see every projection's inputs; and the built-in
calibration text that load-time quantization uses.

How the text is fed is passed in (`Feed`): the engine's `worker.engine.calibrate.feed_text`
runs it through the same paged-attention path as served requests. This package never
imports the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from worker.models.llama import LlamaForCausalLM
from worker.models.quantized import quantizable_linears

# (the statistic so far or None, a projection's input x [T, K] float32) → the new statistic.
StatUpdate = Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]
# Runs token ids through the model (forward passes only, results dropped).
Feed = Callable[[LlamaForCausalLM, list[int]], None]

# Original English + Chinese prose (~1.8k SmolLM2 tokens), written for calibration; it
# shares no text with the evaluation text in bench/data.
BUILTIN_CALIB_TEXT = Path(__file__).with_name("calib_en_zh.txt")


def builtin_calibration_text() -> str:
    return BUILTIN_CALIB_TEXT.read_text(encoding="utf-8")


def channel_absmax(seen: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """SmoothQuant's statistic: per input channel, max |x| over tokens → [K]."""
    channel_max = x.abs().amax(dim=0)
    return channel_max if seen is None else torch.maximum(seen, channel_max)


def input_xtx(seen: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """GPTQ's input Hessian: xᵀx summed over tokens → [K, K] (GPTQ is invariant to its scale)."""
    xtx = x.t() @ x
    return xtx if seen is None else seen.add_(xtx)


def collect_input_stats(
    model: LlamaForCausalLM,
    token_ids: list[int],
    updates: Mapping[str, StatUpdate],
    feed: Feed,
) -> dict[str, dict[str, torch.Tensor]]:
    """Feed the text once (by `feed`), with a forward pre-hook on every projection: for each statistic
    `stat` of `updates`, `stats[stat][name]` becomes `update(stats[stat].get(name), x)` for
    each input x [T, K] (float32) the projection `name` (a `quantizable_linears` name) sees.
    """
    stats: dict[str, dict[str, torch.Tensor]] = {stat: {} for stat in updates}

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            for stat, update in updates.items():
                stats[stat][name] = update(stats[stat].get(name), x)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in quantizable_linears(model)]
    try:
        feed(model, token_ids)
    finally:
        for handle in handles:
            handle.remove()
    return stats
