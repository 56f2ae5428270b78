"""Dense (unquantized) linear layers: which dtype the GEMM runs in on this device.

Where our CPU kernels are built, a bf16 GEMM runs on a copy of the weight packed once
(`packed_weight`) in our kernel's layout (kernels/cpu/gemm.cpp): on AMX tiles, AVX512-BF16
dot products, or, on CPUs without either, FMAs on the bf16 weights widened in registers. It
streams the weights at up to 2x oneDNN's speed for the few rows of a decode step (AVX2: half
the bytes of a float32 GEMM) and applies the MLP's activation in its epilogue.

Without our kernels: where the CPU multiplies bf16 natively, oneDNN's blocked layout (the
plain `F.linear` call reorders the weight on every call, which made the SmolLM2 decode step
1.3-1.5x slower); where it does not (AVX2), oneDNN emulates half-precision GEMMs one row at a
time (~5 GFLOP/s against ~55 in float32 on the same core), so the weights of a bf16/fp16
model are kept widened to float32 (their values stay the bf16/fp16 ones) and the GEMM runs in
float32: bf16 x bf16 products are exact in float32 and half-precision GEMMs accumulate in
float32 anyway, so the result is the same computation, rounded to the model dtype once at the
end. Activations, the KV cache and everything else keep the model dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ops import cpu_kernels

HALF_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def cpu_has_native_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices in hardware (always true for float32)."""
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if dtype == torch.float16:
        return torch.cpu._is_amx_fp16_supported()
    return True


def gemm_weight_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to keep linear weights in, for a model of `dtype` on `device`."""
    if device.type != "cpu" or dtype not in HALF_DTYPES or cpu_has_native_gemm(dtype):
        return dtype
    if dtype == torch.bfloat16 and gemm_kernel():
        return dtype  # our kernel widens bf16 weights in registers
    return torch.float32


@functools.cache
def gemm_kernel() -> str:
    """What our packed GEMMs (bf16 and int8, kernels/cpu/gemm.cpp) run on: "amx", "avx512"
    (AVX512-VNNI and AVX512-BF16 dot products), "avx512vnni" (VNNI for int8, FMAs on widened
    bf16), "avx2" (FMA, vpmaddubsw), or "" where they cannot run (no AVX2, or the kernels
    are not built)."""
    return str(torch.ops.headrace_cpu.gemm_kernel()) if cpu_kernels.available() else ""


def pack_kind(weight: torch.Tensor) -> str | None:
    """How `linear` runs this weight: "headrace" (our kernel), "onednn" (oneDNN's blocked
    layout, where the CPU has bf16 instructions but our kernels are not built), or None
    (plain `F.linear`)."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return None
    if gemm_kernel():
        return "headrace"
    if torch.backends.mkldnn.is_available() and cpu_has_native_gemm(torch.bfloat16):
        return "onednn"
    return None


def packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """weight: [N, K] → the copy `linear(..., packed=...)` reads, or None (`pack_kind`)."""
    kind = pack_kind(weight)
    if kind == "headrace":
        return torch.ops.headrace_cpu.pack_bf16(weight.detach())
    if kind == "onednn":
        # Tuned for a batch of 32 rows; measured as fast as the per-size layouts from 1 to
        # 256 rows on SmolLM2's projections.
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)
    return None


class PackedCopy:
    """A weight's packed copy for a GEMM kernel, made at first use and made again whenever
    the weight changes (its version counter moves: a load, an in-place edit), so that it
    never goes stale."""

    def __init__(self, pack: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        self._pack = pack
        self._cached: tuple[torch.Tensor, int, torch.Tensor | None] | None = None

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        cached = self._cached
        if cached is None or cached[0] is not weight or cached[1] != weight._version:
            cached = self._cached = (weight, weight._version, self._pack(weight))
        return cached[2]


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """x: [T, K] in the model dtype; weight: [N, K], bias: [N], in `gemm_weight_dtype`;
    packed: `packed_weight(weight)`, or None.

    Returns [T, N] in x.dtype.
    """
    if packed is not None and x.dtype == weight.dtype:
        if packed.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return torch.ops.headrace_cpu.packed_linear_bf16(x, packed, weight.shape[0], bias)
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def interleave_gate_up(t: torch.Tensor) -> torch.Tensor:
    """[2I, ...] (gate rows, then up rows) → the same rows as 16 gate, 16 up, 16 gate, ..."""
    gate, up = t.chunk(2, dim=0)
    rest = t.shape[1:]
    return torch.stack([gate.reshape(-1, 16, *rest), up.reshape(-1, 16, *rest)], 1).reshape(t.shape)


def gated_packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """weight: [2I, K] of a fused gate_up projection → its packed copy with each 32-column
    group holding 16 gate columns and the matching 16 up columns (`linear_silu`), or None
    where our kernel does not run it."""
    if pack_kind(weight) != "headrace" or weight.shape[0] % 32:
        return None
    return torch.ops.headrace_cpu.pack_bf16(interleave_gate_up(weight.detach()))


def linear_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: torch.Tensor
) -> torch.Tensor:
    """silu(gate) * up of `linear(x, weight, bias)` in one GEMM whose epilogue applies the
    activation (the same values as the two steps): weight [2I, K] (gate rows, then up rows),
    bias [2I] in the same order, gated: `gated_packed_weight(weight)`; x [T, K] bf16 → [T, I].
    """
    return torch.ops.headrace_cpu.packed_linear_silu_bf16(x, gated, weight.shape[0] // 2, bias)
