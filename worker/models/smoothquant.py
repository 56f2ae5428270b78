"""SmoothQuant: the smoothing factors that move activation outliers into the weights before
W8A8 quantization, from each projection's per-input-channel activation abs-max (collected
by `worker.models.calibration.channel_absmax`).

Per-token int8 activations lose the small channels of a token when a few channels are
huge (LLM activations have such outlier channels). With `s_j = max|X_j|^α / max|W_j|^(1-α)`
the projection computes `(x / s) @ (W * s)ᵀ`, same math, with both factors easier to
quantize (Xiao et al., 2023).
"""

from __future__ import annotations

import torch
from torch import nn

from worker.models.llama import LlamaForCausalLM
from worker.models.quantized import quantizable_linears

DEFAULT_ALPHA = 0.5
# Keeps 0 ** α / 0 ** (1 - α) finite; and factors beyond this range would make one side
# of the product carry a channel's whole magnitude, defeating the point.
_EPS = 1e-5
_MAX_FACTOR = 1e4


def smoothing_factors(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = DEFAULT_ALPHA
) -> torch.Tensor:
    """act_absmax: [K]; weight: [N, K] → s: [K] float32, `max|X_j|^α / max|W_j|^(1-α)`.

    A channel never active in calibration gets s = 1 (left as is): its calibration max
    says nothing about the inputs it may see later.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    act = act_absmax.float().to(weight.device)
    w_absmax = weight.detach().float().abs().amax(dim=0)  # [K]
    s = act.clamp_min(_EPS).pow(alpha) / w_absmax.clamp_min(_EPS).pow(1.0 - alpha)
    s = s.clamp(1.0 / _MAX_FACTOR, _MAX_FACTOR)
    return torch.where(act > 0, s, torch.ones_like(s))


def model_smoothing_factors(
    model: LlamaForCausalLM, act_absmax: dict[str, torch.Tensor], alpha: float = DEFAULT_ALPHA
) -> dict[str, torch.Tensor]:
    """Factors for every projection of `model` (still float), by `quantizable_linears` name."""
    factors = {}
    for name, linear in quantizable_linears(model):
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name} is already quantized")
        if name not in act_absmax:
            raise ValueError(f"no calibration statistics for {name}")
        factors[name] = smoothing_factors(act_absmax[name], linear.weight, alpha)
    return factors
