"""A decode-only step's decoder layers in one C++ call, on CPUs that run our packed GEMMs.

The layers of `worker.models.llama` call a dozen kernels each; at batch 1 the Python
around those calls (modules, the `ops.*` wrappers, the dispatcher's argument parsing) cost
~15% of a SmolLM2 decode step. `kernels/cpu/decode_layers.cpp` runs the same kernels, in
the same order, from one C++ loop; its reference is the Python layer loop it replaces
(tests compare the two bit for bit). Elsewhere (CUDA, no packed GEMM) `available` is False.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops.cpu_kernels import use_cpu_kernels
from ops.linear import gemm_kernel


@dataclass(frozen=True)
class ProjectionOperands:
    """One projection as the C++ loop runs it.

    packed: our GEMM's packed weight (bf16, or int8 for W8A8; gate_up's packed gate/up
    interleaved), made from `source` (the module's weight); bias [N] or None; w_scale [N] float32 (W8A8) or None (bf16); smooth [K]
    float32 or None; columns: N (gate_up: the intermediate size, its output's width);
    rotation: W8A8's Hadamard block (1: none).
    """

    packed: torch.Tensor
    source: torch.Tensor
    bias: torch.Tensor | None
    w_scale: torch.Tensor | None = None
    smooth: torch.Tensor | None = None
    columns: int = 0
    rotation: int = 1


def available(x: torch.Tensor) -> bool:
    """Whether `decode_layers` runs for activations like `x` (CPU, kernels built, packed GEMMs)."""
    return use_cpu_kernels(x) and bool(gemm_kernel())


def decode_layers(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    weights: list[torch.Tensor | None],
    ints: list[int],
    caches: list[torch.Tensor | None],
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    shape: tuple[int, int, int],
    eps: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, hidden] embeddings of T decoding tokens → (last MLP output, residual), [T, hidden].

    weights / ints: per layer, 4 norm weights then (packed, bias, weight scale, smooth) of
    the 4 projections / (output columns, rotation) of each (kernels/cpu/decode_layers.cpp); caches: (key, value, key scales, value scales) per layer;
    block_tables [T, max_blocks] int64, context_lens [T] int32; shape: (num_heads,
    num_kv_heads, head_dim).
    """
    return torch.ops.headrace_cpu.decode_layers(
        x,
        positions,
        cos,
        sin,
        weights,
        ints,
        caches,
        slot_mapping,
        block_tables,
        context_lens,
        *shape,
        eps,
        scale,
    )
