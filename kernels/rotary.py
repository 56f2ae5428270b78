"""Triton rotary embedding (rotate-half convention of HF Llama) for q and k in one launch.

Reference: `ops.rotary.apply_rotary`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    x_ptr,
    out_ptr,
    token,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    num_heads,
    cos_lo,
    cos_hi,
    sin_lo,
    sin_hi,
    offs_d,
    d_mask,
    half,
    BLOCK_H: tl.constexpr,
):
    """out = x * cos + rotate_half(x) * sin for all heads of one token; halves handled apart."""
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < num_heads) & d_mask[None, :]
    src = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    lo = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + token * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(dst, (lo * cos_lo[None, :] - hi * sin_lo[None, :]).to(dtype), mask=mask)
    tl.store(dst + half, (hi * cos_hi[None, :] + lo * sin_hi[None, :]).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_ct,
    stride_st,
    num_heads,
    num_kv_heads,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_KVH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """One program per token: its cos/sin row is loaded once for all q and k heads."""
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < half
    cos = cos_ptr + token * stride_ct + offs_d
    sin = sin_ptr + token * stride_st + offs_d
    cos_lo = tl.load(cos, mask=d_mask, other=0.0).to(tl.float32)
    cos_hi = tl.load(cos + half, mask=d_mask, other=0.0).to(tl.float32)
    sin_lo = tl.load(sin, mask=d_mask, other=0.0).to(tl.float32)
    sin_hi = tl.load(sin + half, mask=d_mask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr, q_out_ptr, token, stride_qt, stride_qh, stride_qot, stride_qoh, num_heads,
        cos_lo, cos_hi, sin_lo, sin_hi, offs_d, d_mask, half, BLOCK_H,
    )  # fmt: skip
    _rotate_heads(
        k_ptr, k_out_ptr, token, stride_kt, stride_kh, stride_kot, stride_koh, num_kv_heads,
        cos_lo, cos_hi, sin_lo, sin_hi, offs_d, d_mask, half, BLOCK_KVH,
    )  # fmt: skip


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of q and k, computed in float32.

    q: [T, H, D]; k: [T, KVH, D] (unit stride on D, e.g. views into the fused qkv output);
    cos, sin: [T, D] float with unit stride on D → (q_out [T, H, D], k_out [T, KVH, D]).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2 or k.shape != (num_tokens, num_kv_heads, head_dim):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need matching T and even D")
    if cos.shape != (num_tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [{num_tokens}, {head_dim}]")
    if any(t.stride(-1) != 1 for t in (q, k, cos, sin)):
        raise ValueError("q, k, cos and sin need a unit stride on D")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, q_out, k_out, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos.stride(0), sin.stride(0), num_heads, num_kv_heads, half,
        BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_KVH=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
    )  # fmt: skip
    return q_out, k_out
