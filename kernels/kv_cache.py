"""Triton `reshape_and_cache`: scatter new K/V into their pages, quantizing to int8 on write.

Reference: `ops.attention.reshape_and_cache` (full precision) and
`ops.kv_cache.reshape_and_cache_int8` (int8 codes + one scale per token and kv head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INT8_MAX = tl.constexpr(127.0)
MIN_SCALE = 2.0**-20  # same floor as ops.quant.MIN_SCALE


@triton.jit
def _write_token(
    x_ptr,
    cache_ptr,
    scale_ptr,
    token,
    block,
    offset,
    stride_xt,
    stride_xh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_sb,
    stride_st,
    stride_sh,
    num_kv_heads,
    head_dim,
    min_scale,
    QUANT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Write one token's [num_kv_heads, head_dim] rows into page `block`, slot `offset`."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < num_kv_heads
    mask = h_mask[:, None] & (offs_d[None, :] < head_dim)
    x = tl.load(
        x_ptr + token * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    dst = cache_ptr + block * stride_cb + offset * stride_ct
    dst += offs_h[:, None] * stride_ch + offs_d[None, :]
    if QUANT:
        x = x.to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        # Round the scale to the pool's dtype first: the codes must match the stored scale.
        # div_rn: IEEE division as in torch (the default `/` is approximate on GPUs and can
        # flip codes that sit exactly on .5, common with half-precision inputs).
        scale = tl.maximum(tl.math.div_rn(amax, INT8_MAX), min_scale)
        scale = scale.to(scale_ptr.dtype.element_ty)
        codes = tl.floor(tl.math.div_rn(x, scale.to(tl.float32)[:, None]) + 0.5)
        codes = tl.minimum(tl.maximum(codes, -INT8_MAX), INT8_MAX)
        tl.store(dst, codes.to(tl.int8), mask=mask)
        scale_dst = scale_ptr + block * stride_sb + offset * stride_st + offs_h * stride_sh
        tl.store(scale_dst, scale, mask=h_mask)
    else:
        tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    key_scale_ptr,
    value_scale_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_sb,
    stride_st,
    stride_sh,
    num_kv_heads,
    head_dim,
    block_size,
    min_scale,
    QUANT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per token."""
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    block = slot // block_size
    offset = slot % block_size
    _write_token(
        key_ptr, key_cache_ptr, key_scale_ptr, token, block, offset, stride_kt, stride_kh,
        stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh, num_kv_heads, head_dim,
        min_scale, QUANT, BLOCK_H, BLOCK_D,
    )  # fmt: skip
    _write_token(
        value_ptr, value_cache_ptr, value_scale_ptr, token, block, offset, stride_vt, stride_vh,
        stride_cb, stride_ct, stride_ch, stride_sb, stride_st, stride_sh, num_kv_heads, head_dim,
        min_scale, QUANT, BLOCK_H, BLOCK_D,
    )  # fmt: skip


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_scale_cache: torch.Tensor | None = None,
    value_scale_cache: torch.Tensor | None = None,
) -> None:
    """Write K/V of this step's tokens into the paged cache, in place.

    Args:
        key, value: [T, KVH, D] float (unit stride on D; token/head strides free).
        key_cache, value_cache: [num_blocks, block_size, KVH, D], float or int8, any strides
            with a unit stride on D (token-major or head-major pages), the same for both.
        slot_mapping: [T] int32/int64, `block_id * block_size + offset` of each token.
        key_scale_cache, value_scale_cache: [num_blocks, block_size, KVH] float, same strides
            (int8 caches only).
    """
    quant = key_cache.dtype == torch.int8
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value must match, with a unit stride on head_dim")
    check_cache_pools(key_cache, value_cache, num_kv_heads, head_dim)
    if quant:
        check_scale_pools(key_cache, key_scale_cache, value_scale_cache)
        scale_strides = key_scale_cache.stride()
    else:
        scale_strides = (0, 0, 0)
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, key_scale_cache, value_scale_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), *scale_strides,
        num_kv_heads, head_dim, key_cache.shape[1], MIN_SCALE,
        QUANT=quant,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip


def check_cache_pools(
    key_cache: torch.Tensor, value_cache: torch.Tensor, num_kv_heads: int, head_dim: int
) -> None:
    """K/V pools: [num_blocks, block_size, KVH, D], same shape and strides, unit stride on D."""
    if key_cache.dim() != 4 or key_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"cache {tuple(key_cache.shape)} is not [*, *, {num_kv_heads}, {head_dim}]"
        )
    if value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        raise ValueError("key and value caches must have the same shape and strides")
    if key_cache.stride(-1) != 1:
        raise ValueError("caches need a unit stride on head_dim")


def check_scale_pools(
    key_cache: torch.Tensor, key_scales: torch.Tensor | None, value_scales: torch.Tensor | None
) -> None:
    """int8 caches need [num_blocks, block_size, KVH] scale pools with the same strides."""
    if key_scales is None or value_scales is None:
        raise ValueError("an int8 cache needs key_scale_cache and value_scale_cache")
    if key_scales.shape != key_cache.shape[:3] or value_scales.shape != key_scales.shape:
        raise ValueError(f"scale caches must be {tuple(key_cache.shape[:3])}")
    if value_scales.stride() != key_scales.stride():
        raise ValueError("key and value scale caches must have the same strides")
