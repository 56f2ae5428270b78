"""Random paged KV caches for the attention tests: shuffled pages, full-precision or int8."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops import attention as fp_ops
from ops import kv_cache as kv_ops


@dataclass(frozen=True)
class PagedKV:
    """Caches holding `lengths[i]` tokens of sequence i, plus each sequence's K/V as written.

    key_cache, value_cache: [num_blocks, block_size, KVH, D]; scales: [num_blocks, block_size,
    KVH] or None; block_tables: [S, max_blocks] int64 (padded with a valid page id);
    keys[i], values[i]: [lengths[i], KVH, D] in the input dtype.
    """

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    key_scales: torch.Tensor | None
    value_scales: torch.Tensor | None
    block_tables: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def dequantized(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence i's cached K/V in float32 ([n, KVH, D]), as the cache holds them."""
        n = self.keys[i].shape[0]
        out = []
        for cache, scales in (
            (self.key_cache, self.key_scales),
            (self.value_cache, self.value_scales),
        ):
            x = fp_ops.gather_pages(cache, self.block_tables[i], n).float()
            if scales is not None:
                x = x * fp_ops.gather_pages(scales, self.block_tables[i], n).float().unsqueeze(-1)
            out.append(x)
        return out[0], out[1]


def make_paged_kv(
    lengths: list[int],
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    int8: bool,
    device: torch.device,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
    head_major: bool = False,
    token_minor_keys: bool = False,
) -> PagedKV:
    """Write random K/V of each sequence into shuffled pages (through the torch write ops).

    head_major: pools from `allocate_kv_cache`/`allocate_kv_scales` (the engine's storage
    order) instead of contiguous token-major ones; token_minor_keys: with token-minor key
    pages (what the engine allocates for the CPU kernels).
    """
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lengths) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    cache_dtype = torch.int8 if int8 else dtype
    if head_major:
        key_cache = fp_ops.allocate_kv_cache(
            *shape, cache_dtype, device, token_minor=token_minor_keys
        )
        value_cache = fp_ops.allocate_kv_cache(*shape, cache_dtype, device)
        key_scales, value_scales = (
            kv_ops.allocate_kv_scales(*shape[:3], scale_dtype, device) if int8 else None
            for _ in range(2)
        )
    else:
        key_cache, value_cache = (
            torch.zeros(shape, dtype=cache_dtype, device=device) for _ in range(2)
        )
        key_scales, value_scales = (
            torch.zeros(shape[:3], dtype=scale_dtype, device=device) if int8 else None
            for _ in range(2)
        )
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, keys, values = [], [], []
    for n in lengths:
        num_pages = -(-n // block_size)
        table, order = order[:num_pages], order[num_pages:]
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
        slots = torch.tensor(
            [table[p // block_size] * block_size + p % block_size for p in range(n)],
            device=device,
        )
        if int8:
            kv_ops.reshape_and_cache_int8(
                k, v, key_cache, value_cache, key_scales, value_scales, slots
            )
        else:
            fp_ops.reshape_and_cache(k, v, key_cache, value_cache, slots)
        tables.append(table)
        keys.append(k)
        values.append(v)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables], device=device)
    return PagedKV(key_cache, value_cache, key_scales, value_scales, block_tables, keys, values)
