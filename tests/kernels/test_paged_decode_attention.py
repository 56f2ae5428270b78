"""Triton paged decode attention against the torch paths, fp16 and int8 pages, GQA 1/3/8."""

from __future__ import annotations

import pytest
import torch

from ops import attention as fp_ops
from ops import kv_cache as kv_ops
from tests.kernels.conftest import BF16_DOT
from tests.kernels.paged_data import make_paged_kv

kernels = pytest.importorskip("kernels.paged_attention", reason="triton is not installed")

# Lengths around page and tile edges: 1 token, one past a page, and a long one that the
# 64-token partitions split into three (the last one partial).
LENGTHS = [1, 17, 45, 150]
GQA = [(4, 4), (6, 2), (8, 1)]  # (heads, kv heads): ratios 1, 3, 8


def _run(
    device, lengths, heads, kvh, dim, block_size, dtype, int8, partition_size, block_n, head_major
):
    paged = make_paged_kv(lengths, block_size, kvh, dim, dtype, int8, device, head_major=head_major)
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype).to(device)
    context_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    caches = (paged.key_cache, paged.value_cache)
    scales = (paged.key_scales, paged.value_scales)
    scale = dim**-0.5
    # The torch paths called directly: the dispatcher would pick the kernel on CUDA.
    if int8:
        expected = kv_ops.paged_decode_attention_int8(
            query, *caches, *scales, paged.block_tables, context_lens, scale
        )
    else:
        mask = kv_ops.decode_mask(context_lens, paged.block_tables.shape[1] * block_size)
        expected = fp_ops.paged_decode_attention(query, *caches, paged.block_tables, mask, scale)
    actual = kernels.paged_decode_attention(
        query, *caches, paged.block_tables, context_lens, scale, *scales,
        partition_size=partition_size, block_n=block_n,
    )  # fmt: skip
    return actual, expected


@pytest.mark.parametrize("heads,kvh", GQA)
@pytest.mark.parametrize("int8", [False, True], ids=["fp16", "int8"])
@pytest.mark.parametrize(
    "dim,block_size,partition_size,block_n,head_major",
    [(64, 16, 64, 32, False), (128, 32, 512, 64, True)],
    ids=["d64-bs16-split-token_major", "d128-bs32-whole-head_major"],
)
def test_matches_torch(
    device, heads, kvh, int8, dim, block_size, partition_size, block_n, head_major
) -> None:
    actual, expected = _run(
        device, LENGTHS, heads, kvh, dim, block_size, torch.float16, int8,
        partition_size, block_n, head_major,
    )  # fmt: skip
    torch.testing.assert_close(actual, expected, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, BF16_DOT])
@pytest.mark.parametrize("int8", [False, True], ids=["fp", "int8"])
def test_other_dtypes(device, dtype, int8) -> None:
    # float32 tl.dot runs in tf32 on GPUs, hence the tolerance.
    actual, expected = _run(device, [5, 70], 6, 2, 64, 16, dtype, int8, 64, 16, True)
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2e-2)


def test_rejects_mismatched_cache_dtype(device) -> None:
    paged = make_paged_kv([3], 16, 1, 64, torch.float16, False, device)
    query = torch.zeros(1, 2, 64, dtype=torch.float32, device=device)
    lens = torch.tensor([3], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="dtype"):
        kernels.paged_decode_attention(
            query, paged.key_cache, paged.value_cache, paged.block_tables, lens, 0.125
        )
