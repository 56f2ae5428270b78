"""Paged attention ops: write K/V into pages, varlen prefill attention, paged decode attention.

Torch implementations (the CPU path and the reference for the Triton kernels).
Cache layout per layer: `[num_blocks, block_size, num_kv_heads, head_dim]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new K/V into their pages.

    Args:
        key, value: [num_tokens, num_kv_heads, head_dim]
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]
        slot_mapping: [num_tokens] int64, `block_id * block_size + offset` of each token.
    """
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: [length, num_kv_heads, head_dim]."""
    num_blocks = -(-length // cache.shape[1])
    pages = cache[block_table[:num_blocks]]  # [nb, bs, kvh, d]
    return pages.flatten(0, 1)[:length]


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cu_seqlens: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention for prefill chunks, each attending to its cached prefix and itself.

    Args:
        query: [num_tokens, num_heads, head_dim]; key, value: [num_tokens, num_kv_heads, head_dim]
            (this step's tokens, already written to the cache).
        cu_seqlens: [num_seqs + 1] offsets of each chunk in the token dimension.
        context_lens: [num_seqs] tokens in cache after this step (prefix + chunk).
        block_tables: [num_seqs, max_blocks] int64 page ids.
    Returns:
        [num_tokens, num_heads, head_dim]
    """
    out = torch.empty_like(query)
    for i, context_len in enumerate(context_lens):
        start, end = cu_seqlens[i], cu_seqlens[i + 1]
        chunk = end - start
        q = query[start:end].transpose(0, 1)  # [H, n, D]
        if context_len == chunk:
            # No cached prefix: attend within the chunk, straight from this step's K/V.
            k = key[start:end].transpose(0, 1)
            v = value[start:end].transpose(0, 1)
            o = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            k = gather_pages(key_cache, block_tables[i], context_len).transpose(0, 1)
            v = gather_pages(value_cache, block_tables[i], context_len).transpose(0, 1)
            # Bottom-right aligned causal mask: query j sits at position prefix + j.
            q_pos = torch.arange(context_len - chunk, context_len, device=query.device)
            mask = torch.arange(context_len, device=query.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[start:end] = o.transpose(0, 1)
    return out


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence attending to all of its cached tokens.

    Args:
        query: [num_seqs, num_heads, head_dim]
        block_tables: [num_seqs, max_blocks] int64 (padding entries may be any valid id).
        mask: [num_seqs, 1, 1, max_blocks * block_size] bool, True where position < context_len.
    Returns:
        [num_seqs, num_heads, head_dim]
    """
    num_seqs, num_heads, head_dim = query.shape
    k = key_cache[block_tables].flatten(1, 2)  # [S, L, kvh, D]
    v = value_cache[block_tables].flatten(1, 2)
    if query.dtype == torch.float32:
        q = query.view(num_seqs, num_heads, 1, head_dim)
        o = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale, enable_gqa=True
        )
        return o.view_as(query)
    # NOTE: torch's CPU SDPA with a mask is several times slower than two batched
    # matmuls in bf16/fp16 at decode shapes; softmax still runs in float32.
    num_kv_heads = k.shape[2]
    q = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(q, k.permute(0, 2, 3, 1)).float() * scale  # [S, kvh, g, L]
    scores.masked_fill_(~mask.view(num_seqs, 1, 1, -1), float("-inf"))
    probs = scores.softmax(dim=-1).to(query.dtype)
    return torch.matmul(probs, v.transpose(1, 2)).view_as(query)  # [S, kvh, g, D]
