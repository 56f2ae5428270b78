"""Triton W8A8 GEMM: int8 × int8 → int32 accumulation, per-token × per-channel scales (+bias).

Reference: `ops.quant.int8_gemm` (`torch._int_mm` on CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[M, N] = (A[M, K] @ B[N, K]ᵀ) * a_scale[M, None] * b_scale[None, N] + bias[N]."""
    pid = tl.program_id(0)
    # Grouped launch order: GROUP_M row blocks share each column block while it is in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % group_size_m)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=n_mask, other=0.0)
    c = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemm_config(m: int, n: int, k: int) -> dict[str, int]:
    """Tile sizes by problem shape: small M (decode) gets short row tiles and more programs."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_n = 128 if n >= 128 else max(16, triton.next_power_of_2(n))
    block_k = 128 if k >= 128 else max(32, triton.next_power_of_2(k))
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "GROUP_M": 8,
        "num_warps": num_warps,
        "num_stages": 3,
    }


def int8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """W8A8 matmul with the scale epilogue.

    Args:
        a: [M, K] int8 activations; a_scale: [M] float32 (per token).
        b: [N, K] int8 weights (nn.Linear layout, any strides); b_scale: [N] float32.
        bias: [N] float or None.
        config: tile sizes (`gemm_config` by default).
    Returns:
        [M, N] in out_dtype.
    """
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != torch.int8 or b.dtype != torch.int8 or b.shape[1] != k:
        raise ValueError(
            f"need int8 a [M, K] and b [N, K], got {a.dtype} {a.shape}, {b.dtype} {b.shape}"
        )
    if a_scale.shape != (m,) or b_scale.shape != (n,):
        raise ValueError("a_scale must be [M] and b_scale [N]")
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise ValueError("scales must be float32")
    if not (a_scale.is_contiguous() and b_scale.is_contiguous()):
        raise ValueError("scales must be contiguous")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError("bias must be a contiguous [N]")
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    config = config or gemm_config(m, n, k)
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    _int8_gemm_kernel[grid](
        a, b, c, a_scale, b_scale, bias, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None, **config,
    )  # fmt: skip
    return c
