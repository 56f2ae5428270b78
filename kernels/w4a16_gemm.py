"""Triton W4A16 GEMM: fp16/bf16 activations × group-wise asymmetric int4 weights packed two per byte.

Byte i of a weight row holds k = 2i (low nibble) and k = 2i + 1 (high nibble), so a K tile
is computed as two dots: the even columns of x against the low nibbles and the odd columns
against the high ones, each dequantized in registers as `(q - zero) * scale`. Tiles stay
128 deep whatever the group size (32-deep tiles for groups of 32 ran 4x slower on an H100):
a tile inside one group needs one scale and zero per column; a tile of several whole groups
(32 or 64: GGUF Q4_1's layout) loads [groups, BLOCK_N] and broadcasts each over its rows;
any other (even) group size gathers a scale per k pair.

Reference: `ops.quant_int4.w4a16_gemm` (`x @ dequantize_int4(w)ᵀ`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _group_params(
    scales_ptr, zeros_ptr, cols, groups, mask, stride_sn, stride_sg, stride_zn, stride_zg
):
    """Scale and zero point of each (output column, group) pair; the three broadcast."""
    scale = tl.load(scales_ptr + cols * stride_sn + groups * stride_sg, mask=mask, other=0.0)
    zero = tl.load(zeros_ptr + cols * stride_zn + groups * stride_zg, mask=mask, other=0)
    return scale, zero


@triton.jit
def _dequant(codes, scale, zero):
    """codes [P, BLOCK_N] uint8 nibbles; scale, zero broadcastable → float32 (q - zero) * scale."""
    return (codes.to(tl.float32) - zero.to(tl.float32)) * scale.to(tl.float32)


@triton.jit
def _dequant_groups(codes, scale, zero, GROUPS: tl.constexpr):
    """codes [P, BLOCK_N] spanning GROUPS whole groups; scale, zero [GROUPS, BLOCK_N]."""
    p: tl.constexpr = codes.shape[0]
    n: tl.constexpr = codes.shape[1]
    grouped = tl.reshape(codes, (GROUPS, p // GROUPS, n))
    w = _dequant(grouped, scale[:, None, :], zero[:, None, :])
    return tl.reshape(w, (p, n))


@triton.jit
def _w4a16_gemm_kernel(
    x_ptr,
    w_ptr,
    scales_ptr,
    zeros_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    group_size,
    num_groups,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    GROUPS_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_id = pid // (GROUP_M * num_pid_n)
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % group_size_m)
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_K // 2)  # byte (k pair) index within the tile
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        pair = k0 // 2 + offs_b
        b_mask = pair < K // 2
        x_mask = m_mask[:, None] & b_mask[None, :]
        x_even = tl.load(x_rows + (2 * pair)[None, :] * stride_xk, mask=x_mask, other=0.0)
        x_odd = tl.load(x_rows + (2 * pair + 1)[None, :] * stride_xk, mask=x_mask, other=0.0)
        packed = tl.load(
            w_cols + pair[:, None] * stride_wk, mask=b_mask[:, None] & n_mask[None, :], other=0
        )  # [BLOCK_K // 2, BLOCK_N] uint8
        strides = (stride_sn, stride_sg, stride_zn, stride_zg)
        if GROUPS_PER_TILE == 1:  # the tile lies within one group: [1, BLOCK_N]
            scale, zero = _group_params(
                scales_ptr, zeros_ptr, offs_n[None, :], k0 // group_size, n_mask[None, :], *strides
            )
            w_low = _dequant(packed & 0xF, scale, zero)
            w_high = _dequant(packed >> 4, scale, zero)
        elif GROUPS_PER_TILE > 1:  # whole groups: [G, BLOCK_N], each broadcast over its rows
            offs_g = k0 // group_size + tl.arange(0, GROUPS_PER_TILE)
            gn_mask = (offs_g < num_groups)[:, None] & n_mask[None, :]
            scale, zero = _group_params(
                scales_ptr, zeros_ptr, offs_n[None, :], offs_g[:, None], gn_mask, *strides
            )
            w_low = _dequant_groups(packed & 0xF, scale, zero, GROUPS_PER_TILE)
            w_high = _dequant_groups(packed >> 4, scale, zero, GROUPS_PER_TILE)
        else:  # other group sizes: [BLOCK_K / 2, BLOCK_N], a k pair's two k share a group
            g_offs = ((k0 + 2 * offs_b) // group_size)[:, None]
            gn_mask = b_mask[:, None] & n_mask[None, :]
            scale, zero = _group_params(
                scales_ptr, zeros_ptr, offs_n[None, :], g_offs, gn_mask, *strides
            )
            w_low = _dequant(packed & 0xF, scale, zero)
            w_high = _dequant(packed >> 4, scale, zero)
        # Padded rows hold zero codes but x is 0 there, so they add nothing.
        acc += tl.dot(x_even, w_low.to(x_even.dtype))
        acc += tl.dot(x_odd, w_high.to(x_odd.dtype))

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def w4a16_config(m: int, n: int) -> dict[str, int]:
    """Tile sizes, for any group size (tiles spanning several groups, or part of one, both work).

    From a sweep on an H200 (bf16, group 128, Llama-3-8B projections): BLOCK_K 128 always;
    for decode-sized M, narrow N tiles unless N is huge (more programs to stream the
    weights); for larger M, 64 x 64 tiles with 4 stages. 2-3x faster than the first
    heuristic (64-wide K, 128-wide N), e.g. M=1 K=14336 N=4096: 287 -> 129 us.
    """
    if m <= 16:
        return {
            "BLOCK_M": 16,
            "BLOCK_N": 128 if n >= 16384 else 32,
            "BLOCK_K": 128,
            "GROUP_M": 8,
            "num_warps": 4,
            "num_stages": 3,
        }
    return {
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "BLOCK_K": 128,
        "GROUP_M": 8,
        "num_warps": 4,
        "num_stages": 4,
    }


def w4a16_gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """x @ dequant(W)ᵀ + bias.

    Args:
        x: [M, K] fp16/bf16 (fp32 works too), K even.
        packed: [N, K // 2] uint8; scales: [N, ceil(K / group_size)] float;
        zeros: [N, ceil(K / group_size)] uint8 (integer zero points) or float32 (real ones).
        bias: [N] float or None.
    Returns:
        [M, N] in x's dtype.
    """
    m, k = x.shape
    n = packed.shape[0]
    num_groups = triton.cdiv(k, group_size)
    if packed.dtype != torch.uint8 or packed.shape != (n, k // 2) or k % 2:
        raise ValueError(f"packed must be uint8 [N, K/2] for x {tuple(x.shape)}")
    if scales.shape != (n, num_groups) or zeros.shape != (n, num_groups):
        raise ValueError(f"scales and zeros must be [{n}, {num_groups}]")
    if zeros.dtype not in (torch.uint8, torch.float32):
        raise ValueError(f"zeros must be uint8 or float32, got {zeros.dtype}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError("bias must be a contiguous [N]")
    config = dict(config or w4a16_config(m, n))
    block_k = config["BLOCK_K"]
    if group_size % block_k == 0:
        groups_per_tile = 1
    elif block_k % group_size == 0:
        groups_per_tile = block_k // group_size
    else:
        groups_per_tile = 0  # per-pair gather: [BLOCK_K / 2, BLOCK_N] scales and zeros
        if group_size % 2:
            raise ValueError(f"group_size {group_size} must be even (a byte's two k share it)")
        # Those gathered tiles take shared memory per pipeline stage.
        config["num_stages"] = min(config.get("num_stages", 2), 2)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    _w4a16_gemm_kernel[grid](
        x, packed, scales, zeros, bias, out, m, n, k, group_size, num_groups,
        x.stride(0), x.stride(1), packed.stride(0), packed.stride(1),
        scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, GROUPS_PER_TILE=groups_per_tile, **config,
    )  # fmt: skip
    return out
