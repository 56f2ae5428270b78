"""Rotary position embeddings with the RoPE variants of the Llama family (default, linear, llama3, yarn)."""

from __future__ import annotations

from typing import Any

import torch

_SUPPORTED = ("default", "linear", "llama3", "yarn")


class RotaryEmbedding:
    """Precomputed cos/sin tables `[max_positions, head_dim]` in float32, indexed by position.

    Inverse frequencies for scaled variants come from transformers' own
    `ROPE_INIT_FUNCTIONS`, so they match the reference implementation exactly.
    """

    def __init__(self, config: Any, head_dim: int, max_positions: int) -> None:
        params = _rope_parameters(config)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in _SUPPORTED:
            raise ValueError(f"unsupported RoPE type {rope_type!r}; supported: {_SUPPORTED}")
        if rope_type == "default":
            base = float(params["rope_theta"])
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos() * scaling
        self.sin = emb.sin() * scaling
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def to(self, device: torch.device) -> RotaryEmbedding:
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        self._cast.clear()
        return self

    def tables(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) tables [max_positions, head_dim] in `dtype` (HF rounds them to the
        model dtype before use, and so do we); cast once, then cached."""
        key = (dtype, device)
        if key not in self._cast:
            self._cast[key] = (self.cos.to(device, dtype), self.sin.to(device, dtype))
        return self._cast[key]

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] int64 → (cos, sin), each [T, 1, head_dim] in `dtype`."""
        cos, sin = self.tables(dtype, positions.device)
        return cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)


def _rope_parameters(config: Any) -> dict[str, Any]:
    """transformers ≥ 5 keeps RoPE settings in `rope_parameters`; 4.x in `rope_theta` + `rope_scaling`."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    scaling = getattr(config, "rope_scaling", None) or {}
    return {**scaling, "rope_theta": getattr(config, "rope_theta", 10000.0)}
