"""Triton varlen causal prefill attention for chunked prefill, reading the cached prefix from pages.

A step's prefill chunks are packed along the token axis (`cu_seqlens`). Chunk i holds the
last `chunk_i` of its sequence's `context_len_i` tokens: its queries attend to the
`context_len_i - chunk_i` earlier tokens in the (fp or int8) pages, then causally to the
chunk itself, read in full precision from this step's `key`/`value`.
One program handles BLOCK_M queries of one chunk and one head.

Reference: `ops.attention.prefill_attention` (fp) and `ops.kv_cache.prefill_attention_int8`.
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


@triton.jit
def _prefill_kernel(
    out_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    k_scale_ptr,
    v_scale_ptr,
    block_tables_ptr,
    cu_seqlens_ptr,
    context_lens_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_sb,
    stride_st,
    stride_sh,
    stride_bt,
    queries_per_kv,
    head_dim,
    block_size,
    QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    chunk = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= chunk:
        return
    prefix = tl.load(context_lens_ptr + seq) - chunk
    kv_head = head // queries_per_kv

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < chunk
    d_mask = offs_d < head_dim
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # The cached prefix: every query sees all of it.
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(0, prefix, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < prefix
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

    # The chunk itself, causally, in full precision; tiles past this query block are skipped.
    hi = tl.minimum(chunk, (m_block + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + offs_n
        n_mask = cols < chunk
        kv_rows = (q_start + cols).to(tl.int64)
        k_t = tl.load(
            k_ptr + kv_rows[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None],
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        v = tl.load(
            v_ptr + kv_rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        causal = (cols[None, :] <= offs_m[:, None]) & n_mask[None, :]
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_t, v, None, None, causal, qk_scale, False)

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cu_seqlens: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_chunk_len: int,
    key_scale_cache: torch.Tensor | None = None,
    value_scale_cache: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Causal attention of packed prefill chunks over their cached prefix and themselves.

    Args:
        query: [T, H, D] fp16/bf16/fp32; key, value: [T, KVH, D] (this step's K/V, already
            written to the cache); unit stride on D.
        key_cache, value_cache: [num_blocks, block_size, KVH, D], query's dtype or int8; any
            strides with a unit stride on D (token- or head-major pages), the same for both.
        cu_seqlens: [S + 1] int32, chunk offsets in T; context_lens: [S] int32, tokens cached
            after this step (prefix + chunk).
        block_tables: [S, max_blocks] int32/int64.
        max_chunk_len: longest chunk (host int: sizes the grid without a device sync).
        key_scale_cache, value_scale_cache: [num_blocks, block_size, KVH] float, same strides
            (int8 caches only).
        block_m, block_n: query rows and K/V tokens per tile (powers of two ≥ 16).
    Returns:
        [T, H, D] in query's dtype.
    """
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    num_seqs = context_lens.shape[0]
    scale_strides = check_attention_inputs(
        query, key_cache, value_cache, block_tables, key_scale_cache, value_scale_cache
    )
    if key.shape != (num_tokens, num_kv_heads, head_dim) or value.shape != key.shape:
        raise ValueError(f"key/value {tuple(key.shape)} do not match query and caches")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key/value need a unit stride on head_dim")
    if cu_seqlens.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError("cu_seqlens needs S + 1 entries, block_tables S rows")
    for size in (block_m, block_n):
        if size < 16 or size & (size - 1):
            raise ValueError(f"tile sizes must be powers of two ≥ 16, got {size}")
    out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    grid = (triton.cdiv(max_chunk_len, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        out, query, key, value, key_cache, value_cache, key_scale_cache, value_scale_cache,
        block_tables, cu_seqlens, context_lens, scale * LOG2E,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), *scale_strides,
        block_tables.stride(0), num_heads // num_kv_heads, head_dim, key_cache.shape[1],
        QUANT=key_cache.dtype == torch.int8, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip
    return out
