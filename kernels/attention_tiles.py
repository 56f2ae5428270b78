"""Building blocks shared by the attention kernels: paged K/V tile loads and the online softmax.

Scores live in the log2 domain (`qk * sm_scale * log2(e)`), so the softmax uses exp2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.kv_cache import check_cache_pools, check_scale_pools

LOG2E = 1.4426950408889634


@triton.jit
def page_slots(
    block_table_ptr, pos, n_mask, block_size, stride_cb, stride_ct, stride_sb, stride_st
):
    """Element offsets of positions `pos` [BLOCK_N] of one sequence in the cache and scale pools.

    Returns (cache_offsets [BLOCK_N] int64, scale_offsets [BLOCK_N] int64); the caller adds the
    kv head's offset. Pages may be token- or head-major: only strides are used. Masked
    positions point at page 0 and must stay masked.
    """
    page = tl.load(block_table_ptr + pos // block_size, mask=n_mask, other=0).to(tl.int64)
    in_page = (pos % block_size).to(tl.int64)
    return page * stride_cb + in_page * stride_ct, page * stride_sb + in_page * stride_st


@triton.jit
def load_paged_kv(
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    cache_offs,
    scale_offs,
    n_mask,
    offs_d,
    d_mask,
    QUANT: tl.constexpr,
):
    """One tile of K (transposed) and V from the pages, codes converted exactly to float32.

    cache_offs / scale_offs: [BLOCK_N] (kv head included) → k_t [BLOCK_D, BLOCK_N],
    v [BLOCK_N, BLOCK_D] in the cache dtype (fp) or float32 (int8), and the per-token scales
    k_scale, v_scale [BLOCK_N] float32 (ones for full-precision caches).
    """
    k_t = tl.load(
        k_cache_ptr + cache_offs[None, :] + offs_d[:, None],
        mask=n_mask[None, :] & d_mask[:, None],
        other=0.0,
    )
    v = tl.load(
        v_cache_ptr + cache_offs[:, None] + offs_d[None, :],
        mask=n_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if QUANT:
        k_scale = tl.load(k_scale_ptr + scale_offs, mask=n_mask, other=0.0).to(tl.float32)
        v_scale = tl.load(v_scale_ptr + scale_offs, mask=n_mask, other=0.0).to(tl.float32)
        k_t = k_t.to(tl.float32)
        v = v.to(tl.float32)
    else:
        k_scale = tl.full(n_mask.shape, 1.0, tl.float32)
        v_scale = tl.full(n_mask.shape, 1.0, tl.float32)
    return k_t, v, k_scale, v_scale


@triton.jit
def attend_tile(
    acc,
    m_i,
    l_i,
    q,
    k_t,
    v,
    k_scale,
    v_scale,
    mask,
    qk_scale,
    QUANT: tl.constexpr,
):
    """One online-softmax step of `q` [BLOCK_M, BLOCK_D] over a K/V tile of BLOCK_N tokens.

    k_t: [BLOCK_D, BLOCK_N]; v: [BLOCK_N, BLOCK_D]; k_scale, v_scale: [BLOCK_N] float32;
    mask: [BLOCK_M, BLOCK_N] bool (every row of the first tile must have a True);
    acc [BLOCK_M, BLOCK_D], m_i, l_i [BLOCK_M]: float32 running output, max and sum.
    The int8 scales are folded into the scores (K) and the probabilities (V), so the
    dequantized tile is never materialized.
    """
    # "ieee": float32 inputs (the exactness tests) are multiplied in full float32, not
    # TF32; fp16/bf16 tiles take the tensor cores either way.
    qk = tl.dot(q, k_t.to(q.dtype), input_precision="ieee")  # [BLOCK_M, BLOCK_N] float32
    if QUANT:
        qk = qk * k_scale[None, :]
    qk = tl.where(mask, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if QUANT:
        p = p * v_scale[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
    return acc, m_new, l_i


def check_attention_inputs(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    key_scale_cache: torch.Tensor | None,
    value_scale_cache: torch.Tensor | None,
) -> tuple[int, int, int]:
    """Validate what both attention launchers share; returns the scale pools' strides (or 0s)."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    check_cache_pools(key_cache, value_cache, num_kv_heads, head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} heads are not a multiple of {num_kv_heads} kv heads")
    if query.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("query needs a unit stride on head_dim, block_tables on its rows")
    if key_cache.dtype == torch.int8:
        check_scale_pools(key_cache, key_scale_cache, value_scale_cache)
        return key_scale_cache.stride()
    if key_cache.dtype != query.dtype:
        raise ValueError(f"cache dtype {key_cache.dtype} differs from query dtype {query.dtype}")
    return (0, 0, 0)
