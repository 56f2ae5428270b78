"""Paged attention ops: write K/V into pages, varlen prefill attention, paged decode attention.

Torch implementations (the CPU path and the reference for the Triton kernels).
Cache layout per layer: `[num_blocks, block_size, num_kv_heads, head_dim]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ops.linear import HALF_DTYPES, cpu_has_native_gemm


def allocate_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    token_minor: bool = False,
) -> torch.Tensor:
    """One layer's K (or V) pool, zeroed.

    Returns a `[num_blocks, block_size, num_kv_heads, head_dim]` view whose storage
    is head-major pages `[num_blocks, num_kv_heads, block_size, head_dim]`: decode
    attention then gathers whole per-head pages (block_size * head_dim contiguous
    elements) instead of head_dim-sized rows, several times faster on CPU. Kernels
    address the pool through its strides, so either storage order works for them.

    token_minor: pages `[num_blocks, num_kv_heads, head_dim, block_size]` instead, for the
    keys of the CPU kernels (`ops.kv_cache.token_minor_keys`): one row then holds a value of
    every token of the page, so a page's scores are vector FMAs across its tokens.
    """
    if token_minor:
        pages = torch.zeros(
            num_blocks, num_kv_heads, head_dim, block_size, dtype=dtype, device=device
        )
        return pages.permute(0, 3, 1, 2)
    pages = torch.zeros(num_blocks, num_kv_heads, block_size, head_dim, dtype=dtype, device=device)
    return pages.permute(0, 2, 1, 3)


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
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim] (any strides)
        slot_mapping: [num_tokens] int64, `block_id * block_size + offset` of each token.
    """
    block_size = key_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    key_cache[blocks, offsets] = key
    value_cache[blocks, offsets] = value


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
            o = sdpa(q, k, v, None, scale)
        else:
            k = gather_pages(key_cache, block_tables[i], context_len).transpose(0, 1)
            v = gather_pages(value_cache, block_tables[i], context_len).transpose(0, 1)
            # Bottom-right aligned causal mask: query j sits at position prefix + j.
            q_pos = torch.arange(context_len - chunk, context_len, device=query.device)
            mask = torch.arange(context_len, device=query.device)[None, :] <= q_pos[:, None]
            o = sdpa(q, k, v, mask, scale)
        out[start:end] = o.transpose(0, 1)
    return out


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Causal (or masked) GQA attention of one sequence: q [H, n, D], k/v [KVH, m, D].

    Called with a batch dimension: 3-D inputs with `enable_gqa` take SDPA's unfused math
    path on CPU (4.5x slower than its flash kernel for a 128-token chunk of SmolLM2).
    Half-precision inputs on a CPU without half-precision matrix instructions run in
    float32: SDPA's flash kernel multiplies them with oneDNN's emulated bf16 GEMMs there
    (a 128-token SmolLM2 chunk: 3.4 ms in bf16, 0.5 ms through float32, AVX2 Zen 3).
    """
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in HALF_DTYPES and not cpu_has_native_gemm(dtype):
        q, k, v = q.float(), k.float(), v.float()
    o = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None, scale=scale,
        enable_gqa=True,
    )  # fmt: skip
    return o[0].to(dtype)


class DecodeWorkspace:
    """Reusable buffers for gathering pages in `paged_decode_attention` on CPU.

    NOTE: allocating a fresh multi-MB tensor per layer costs more than the gather
    itself on CPU (page faults), so the gathered K/V land in buffers reused across
    layers and steps. The gather index depends only on the block tables, so it is
    computed once per step (the same `block_tables` object is passed to every layer).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        # id(block_tables) → (block_tables, index); the tensor is kept so its id stays unique.
        self._indexes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def new_step(self) -> None:
        """Forget the previous step's gather indexes (buffers are kept)."""
        self._indexes.clear()

    def buffer(
        self, name: str, numel: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < numel or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[(name, dtype)] = buf
        return buf[:numel]

    def gather_index(
        self, block_tables: torch.Tensor, num_kv_heads: int, block_size: int
    ) -> torch.Tensor:
        entry = self._indexes.get(id(block_tables))
        if entry is None or entry[0] is not block_tables:
            entry = (block_tables, _head_major_index(block_tables, num_kv_heads, block_size))
            self._indexes[id(block_tables)] = entry
        return entry[1]


def _head_major_index(
    block_tables: torch.Tensor, num_kv_heads: int, block_size: int
) -> torch.Tensor:
    """Page ids into head-major storage viewed as [num_blocks * num_kv_heads, block_size * head_dim].

    Ordered [num_seqs, num_kv_heads, max_blocks] so the gather yields per-head
    contiguous K/V `[num_seqs, num_kv_heads, max_blocks * block_size, head_dim]`.
    """
    heads = torch.arange(num_kv_heads, device=block_tables.device).view(1, -1, 1)
    return (block_tables[:, None, :] * num_kv_heads + heads).view(-1)


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    workspace: DecodeWorkspace | None = None,
) -> torch.Tensor:
    """One query token per sequence attending to all of its cached tokens.

    Args:
        query: [num_seqs, num_heads, head_dim]
        block_tables: [num_seqs, max_blocks] int64 (padding entries may be any valid id).
        mask: [num_seqs, 1, 1, max_blocks * block_size] bool, True where position < context_len.
        workspace: reusable gather buffers (the engine passes one; tests may not).
    Returns:
        [num_seqs, num_heads, head_dim]
    """
    workspace = workspace or DecodeWorkspace()
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    span = block_tables.shape[1] * block_size
    index = workspace.gather_index(block_tables, num_kv_heads, block_size)
    shape = (num_seqs, num_kv_heads, span, head_dim)
    numel = num_seqs * num_kv_heads * span * head_dim
    k_buf = workspace.buffer("k", numel, key_cache.dtype, query.device)
    v_buf = workspace.buffer("v", numel, value_cache.dtype, query.device)
    k = _gather_pages(key_cache, index, k_buf).view(shape)
    v = _gather_pages(value_cache, index, v_buf).view(shape)
    # The query heads of one kv head are the rows of a [g, D] query "sequence", so plain SDPA
    # (one fused CPU kernel, ~3.5x faster than matmul + softmax + matmul here) does GQA
    # without repeating K/V.
    q = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.view(num_seqs, 1, 1, span), scale=scale
    )
    return out.reshape(query.shape)  # SDPA may return a non-contiguous [S, kvh, g, D]


def _gather_pages(cache: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Copy head-major pages `index` of `cache` into `out` ([len(index), block_size * head_dim])."""
    # A no-op for pools from `allocate_kv_cache`; other layouts pay for a full copy.
    pages = cache.permute(0, 2, 1, 3).contiguous()
    rows = pages.view(-1, pages.shape[2] * pages.shape[3])
    return torch.index_select(rows, 0, index, out=out.view(-1, rows.shape[1]))
