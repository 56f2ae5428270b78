"""Dense (unquantized) linear layers: which dtype the GEMM runs in on this device.

On CPUs without native bf16/fp16 matrix instructions (no AVX512-BF16 or AMX, e.g. AVX2-only
hosts), oneDNN emulates half-precision GEMMs one row at a time: ~5 GFLOP/s against ~55 in
float32 on the same core, and no faster per row at larger batches. There, the weights of a
bf16/fp16 model are kept widened to float32 (their values stay the bf16/fp16 ones) and the
GEMM runs in float32: bf16 x bf16 products are exact in float32 and half-precision GEMMs
accumulate in float32 anyway, so the result is the same computation, rounded to the model
dtype once at the end. Activations, the KV cache and everything else keep the model dtype.

Where the CPU does multiply bf16 natively (AVX512-BF16 or AMX), the GEMM runs on a copy of
the weight that oneDNN has reordered once into its blocked layout (`packed_weight`): the
plain `F.linear` call reorders (or reads unblocked) the weight on every call, which made the
SmolLM2 decode step 1.3-1.5x slower (54 → 43 ms at batch 1, 118 → 80 ms at batch 32, 2-core
Xeon with AMX).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

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
    if device.type == "cpu" and dtype in HALF_DTYPES and not cpu_has_native_gemm(dtype):
        return torch.float32
    return dtype


def packs_weights(weight: torch.Tensor) -> bool:
    """Whether `linear` runs this weight from a oneDNN-packed copy (`packed_weight`)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and cpu_has_native_gemm(torch.bfloat16)
    )


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight: [N, K] bf16 → the same values in oneDNN's blocked layout (an opaque mkldnn
    tensor) for `linear(..., packed=...)`; only where `packs_weights(weight)`."""
    # The layout is tuned for a batch of 32 rows; measured as fast as the per-size layouts
    # from 1 to 256 rows on SmolLM2's projections.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)


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
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
