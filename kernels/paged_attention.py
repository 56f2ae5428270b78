"""Triton paged decode attention: one query token per sequence, GQA, fp or int8 KV pages.

One program handles one (sequence, kv head, context partition): the kv head's query heads
are the rows of the `tl.dot` (padded to 16), so each K/V page is read once per kv head.
Long contexts are split into partitions of PARTITION_SIZE tokens (flash-decoding); a second
kernel merges the partitions' partial softmax states.

Reference: `ops.attention.paged_decode_attention` (fp) and
`ops.kv_cache.paged_decode_attention_int8` (int8).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_tiles import (
    LOG2E,
    attend_tile,
    check_attention_inputs,
    load_paged_kv,
    page_slots,
)

# Launch defaults from a sweep on an H100 (Llama-3-8B heads, bf16 and int8 pages; block_n
# 32-128, 2-8 warps, 2-4 stages, partitions of 512 or 1024): 2 warps, 2 stages, 64-token
# steps and 1024-token partitions were fastest in each finished case, 1.15-1.32x over 4
# warps, 3 stages, 512 (int8, 64 x 1024 tokens: 132 -> 100 us).
DEFAULT_PARTITION_SIZE = 1024


@triton.jit
def _paged_decode_kernel(
    out_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_tables_ptr,
    context_lens_ptr,
    qk_scale,
    stride_qs,
    stride_qh,
    stride_os,
    stride_oh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_sb,
    stride_st,
    stride_sh,
    stride_bt,
    num_heads,
    num_partitions,
    queries_per_kv,
    head_dim,
    block_size,
    QUANT: tl.constexpr,
    SPLIT: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = part * PARTITION_SIZE
    if start >= context_len:
        return
    end = tl.minimum(start + PARTITION_SIZE, context_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < queries_per_kv
    d_mask = offs_d < head_dim
    heads = kv_head * queries_per_kv + offs_g
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        cache_offs, scale_offs = page_slots(
            block_table_ptr, pos, n_mask, block_size, stride_cb, stride_ct, stride_sb, stride_st
        )
        k_t, v, k_scale, v_scale = load_paged_kv(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, cache_offs + kv_head * stride_ch,
            scale_offs + kv_head * stride_sh, n_mask, offs_d, d_mask, QUANT,
        )  # fmt: skip
        acc, m_i, l_i = attend_tile(
            acc, m_i, l_i, q, k_t, v, k_scale, v_scale, n_mask[None, :], qk_scale, QUANT
        )

    if SPLIT:
        # Unnormalized partial state of this partition, merged by _merge_partitions_kernel.
        row = (seq * num_heads + heads) * num_partitions + part  # [BLOCK_G]
        tl.store(part_max_ptr + row, m_i, mask=g_mask)
        tl.store(part_sum_ptr + row, l_i, mask=g_mask)
        tl.store(
            part_out_ptr + row[:, None] * head_dim + offs_d[None, :],
            acc,
            mask=g_mask[:, None] & d_mask[None, :],
        )
    else:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )


@triton.jit
def _merge_partitions_kernel(
    out_ptr,
    part_out_ptr,
    part_max_ptr,
    part_sum_ptr,
    context_lens_ptr,
    stride_os,
    stride_oh,
    num_heads,
    num_partitions,
    head_dim,
    PARTITION_SIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (sequence, head): softmax-weighted sum of the partitions' outputs."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    # Partitions past the context were never written.
    p_mask = offs_p < tl.cdiv(context_len, PARTITION_SIZE)
    d_mask = offs_d < head_dim
    row = (seq * num_heads + head) * num_partitions + offs_p
    m = tl.load(part_max_ptr + row, mask=p_mask, other=float("-inf"))
    sums = tl.load(part_sum_ptr + row, mask=p_mask, other=0.0)
    weight = tl.exp2(m - tl.max(m, axis=0))  # 0 on unwritten partitions
    acc = tl.load(
        part_out_ptr + row[:, None] * head_dim + offs_d[None, :],
        mask=p_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(sums * weight, axis=0)
    tl.store(
        out_ptr + seq * stride_os + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    key_scale_cache: torch.Tensor | None = None,
    value_scale_cache: torch.Tensor | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    block_n: int = 64,
    num_warps: int = 2,
    num_stages: int = 2,
) -> torch.Tensor:
    """softmax(q·Kᵀ·scale)·V of one query token per sequence over its paged context.

    Args:
        query: [S, H, D] fp16/bf16/fp32, unit stride on D.
        key_cache, value_cache: [num_blocks, block_size, KVH, D], query's dtype or int8; any
            strides with a unit stride on D (token- or head-major pages), the same for both.
        block_tables: [S, max_blocks] int32/int64, unit stride on its rows.
        context_lens: [S] int32/int64, each ≥ 1 and ≤ max_blocks * block_size.
        key_scale_cache, value_scale_cache: [num_blocks, block_size, KVH] float, same strides
            (int8 caches only).
        partition_size: tokens per program; contexts that may exceed it (judged from
            block_tables' width, without a device sync) are split and merged.
        block_n: K/V tokens per inner step (power of two ≥ 16, divides partition_size).
        num_warps, num_stages: the decode kernel's launch options.
    Returns:
        [S, H, D] in query's dtype.
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    quant = key_cache.dtype == torch.int8
    scale_strides = check_attention_inputs(
        query, key_cache, value_cache, block_tables, key_scale_cache, value_scale_cache
    )
    if block_tables.shape[0] != num_seqs or context_lens.shape != (num_seqs,):
        raise ValueError("block_tables and context_lens need one row per sequence")
    if partition_size % block_n or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n {block_n} must be a power of two ≥ 16 dividing partition_size")
    out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    max_len = block_tables.shape[1] * key_cache.shape[1]
    num_partitions = triton.cdiv(max_len, partition_size)
    split = num_partitions > 1
    if split:
        part_out = torch.empty(
            num_seqs, num_heads, num_partitions, head_dim, dtype=torch.float32, device=query.device
        )
        part_max = torch.empty(part_out.shape[:3], dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = out  # unused
    queries_per_kv = num_heads // num_kv_heads
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        out, part_out, part_max, part_sum, query, key_cache, value_cache,
        key_scale_cache, value_scale_cache, block_tables, context_lens, scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), *scale_strides,
        block_tables.stride(0), num_heads, num_partitions, queries_per_kv, head_dim,
        key_cache.shape[1],
        QUANT=quant, SPLIT=split, PARTITION_SIZE=partition_size,
        BLOCK_G=max(16, triton.next_power_of_2(queries_per_kv)),
        BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if split:
        _merge_partitions_kernel[(num_seqs, num_heads)](
            out, part_out, part_max, part_sum, context_lens, out.stride(0), out.stride(1),
            num_heads, num_partitions, head_dim, PARTITION_SIZE=partition_size,
            BLOCK_P=triton.next_power_of_2(num_partitions),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )  # fmt: skip
    return out
