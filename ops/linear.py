"""Dense (unquantized) linear layers: which dtype the GEMM runs in on this device.

On CPUs without native bf16/fp16 matrix instructions (no AVX512-BF16 or AMX, e.g. AVX2-only
hosts), oneDNN emulates half-precision GEMMs one row at a time: ~5 GFLOP/s against ~55 in
float32 on the same core, and no faster per row at larger batches. There, the weights of a
bf16/fp16 model are kept widened to float32 (their values stay the bf16/fp16 ones) and the
GEMM runs in float32: bf16 x bf16 products are exact in float32 and half-precision GEMMs
accumulate in float32 anyway, so the result is the same computation, rounded to the model
dtype once at the end. Activations, the KV cache and everything else keep the model dtype.
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: [T, K] in the model dtype; weight: [N, K], bias: [N], in `gemm_weight_dtype`.

    Returns [T, N] in x.dtype.
    """
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
