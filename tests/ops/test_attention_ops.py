"""Paged attention ops against a naive per-sequence attention over contiguous K/V."""

from __future__ import annotations

import pytest
import torch

from ops import attention as ops


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
    """q: [n, H, D] at positions offset..offset+n-1; k, v: [offset+n, KVH, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * q.shape[-1] ** -0.5
    n, total = q.shape[0], k.shape[0]
    allowed = torch.arange(total)[None, :] <= (torch.arange(n) + offset)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _paged(
    lengths: list[int],
    block_size: int,
    kvh: int,
    dim: int,
    dtype: torch.dtype,
    head_major: bool = True,
):
    """Random K/V for each sequence written to shuffled pages; returns caches, tables, contiguous K/V."""
    gen = torch.Generator().manual_seed(0)
    num_blocks = sum(-(-n // block_size) for n in lengths) + 3
    shape = (num_blocks, block_size, kvh, dim)
    if head_major:
        cpu = torch.device("cpu")
        k_cache = ops.allocate_kv_cache(*shape, dtype, cpu)
        v_cache = ops.allocate_kv_cache(*shape, dtype, cpu)
    else:
        k_cache, v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, ks, vs = [], [], []
    for n in lengths:
        nb = -(-n // block_size)
        table, order = order[:nb], order[nb:]
        k = torch.randn(n, kvh, dim, generator=gen).to(dtype)
        v = torch.randn(n, kvh, dim, generator=gen).to(dtype)
        slots = torch.tensor(
            [table[p // block_size] * block_size + p % block_size for p in range(n)]
        )
        ops.reshape_and_cache(k, v, k_cache, v_cache, slots)
        tables.append(table)
        ks.append(k)
        vs.append(v)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    return k_cache, v_cache, block_tables, ks, vs


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads,kvh", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("head_major", [True, False])
def test_paged_decode_attention(
    dtype: torch.dtype, tol: float, heads: int, kvh: int, head_major: bool
) -> None:
    lengths, block_size, dim = [1, 17, 40, 5], 16, 32
    k_cache, v_cache, tables, ks, vs = _paged(lengths, block_size, kvh, dim, dtype, head_major)
    workspace = ops.DecodeWorkspace()
    # Two steps with different tables through one workspace: buffers and index are reused safely.
    for rows in ([0, 1, 2, 3], [2, 0]):
        q = torch.randn(len(rows), heads, dim).to(dtype)
        lens = [lengths[r] for r in rows]
        step_tables = tables[rows][:, : -(-max(lens) // block_size)].clone()
        span = step_tables.shape[1] * block_size
        mask = (torch.arange(span)[None, :] < torch.tensor(lens)[:, None]).view(
            len(rows), 1, 1, span
        )
        out = ops.paged_decode_attention(
            q, k_cache, v_cache, step_tables, mask, dim**-0.5, workspace
        )
        for i, r in enumerate(rows):
            expected = _naive(q[i : i + 1], ks[r], vs[r], offset=lengths[r] - 1)
            torch.testing.assert_close(out[i : i + 1].float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("heads,kvh", [(4, 4), (6, 2)])
def test_prefill_attention_with_cached_prefix(heads: int, kvh: int) -> None:
    # Sequence 0 is a fresh prefill; sequence 1 a chunk after a 21-token cached prefix.
    lengths, chunks, block_size, dim = [9, 30], [9, 9], 8, 16
    k_cache, v_cache, tables, ks, vs = _paged(lengths, block_size, kvh, dim, torch.float32)
    q = torch.randn(sum(chunks), heads, dim)
    k_new = torch.cat([ks[i][-c:] for i, c in enumerate(chunks)])
    v_new = torch.cat([vs[i][-c:] for i, c in enumerate(chunks)])
    out = ops.prefill_attention(
        q, k_new, v_new, k_cache, v_cache, [0, 9, 18], lengths, tables, dim**-0.5
    )
    for i, (n, c) in enumerate(zip(lengths, chunks, strict=True)):
        expected = _naive(q[9 * i : 9 * i + c], ks[i], vs[i], offset=n - c)
        torch.testing.assert_close(out[9 * i : 9 * i + c], expected, atol=1e-5, rtol=1e-5)
