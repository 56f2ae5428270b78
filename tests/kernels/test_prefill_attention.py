"""Triton varlen prefill attention (cached prefix from pages + causal chunk) against torch."""

from __future__ import annotations

import pytest
import torch

from ops import attention as fp_ops
from ops import kv_cache as kv_ops
from tests.kernels.conftest import BF16_DOT
from tests.kernels.paged_data import make_paged_kv

kernels = pytest.importorskip("kernels.prefill_attention", reason="triton is not installed")

# (context after the step, chunk): a fresh prompt; a chunk after a prefix ending mid-page;
# a chunk of three 16-row query tiles (the last partial) after exactly one page.
SEQS = [(20, 20), (46, 9), (49, 33)]
GQA = [(2, 2), (3, 1), (8, 1)]  # (heads, kv heads): ratios 1, 3, 8


def _run(device, seqs, heads, kvh, dim, block_size, dtype, int8, block_n, head_major):
    lengths = [n for n, _ in seqs]
    chunks = [c for _, c in seqs]
    paged = make_paged_kv(
        lengths, block_size, kvh, dim, dtype, int8, device, seed=3, head_major=head_major
    )
    key = torch.cat([k[-c:] for k, c in zip(paged.keys, chunks, strict=True)])
    value = torch.cat([v[-c:] for v, c in zip(paged.values, chunks, strict=True)])
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(key.shape[0], heads, dim, generator=gen).to(dtype).to(device)
    cu_seqlens = [0]
    for c in chunks:
        cu_seqlens.append(cu_seqlens[-1] + c)
    caches = (paged.key_cache, paged.value_cache)
    scales = (paged.key_scales, paged.value_scales)
    common = (paged.block_tables, dim**-0.5)
    # The torch paths called directly: the dispatcher would pick the kernel on CUDA.
    if int8:
        expected = kv_ops.prefill_attention_int8(
            query, key, value, *caches, *scales, cu_seqlens, lengths, *common
        )
    else:
        expected = fp_ops.prefill_attention(
            query, key, value, *caches, cu_seqlens, lengths, *common
        )
    actual = kernels.prefill_attention(
        query, key, value, *caches,
        torch.tensor(cu_seqlens, dtype=torch.int32, device=device),
        torch.tensor(lengths, dtype=torch.int32, device=device),
        *common, max(chunks), *scales, block_m=16, block_n=block_n,
    )  # fmt: skip
    return actual, expected


@pytest.mark.parametrize("heads,kvh", GQA)
@pytest.mark.parametrize("int8", [False, True], ids=["fp16", "int8"])
@pytest.mark.parametrize(
    "dim,block_size,block_n,head_major",
    [(64, 16, 32, True), (128, 32, 16, False)],
    ids=["d64-bs16-head_major", "d128-bs32-token_major"],
)
def test_matches_torch(device, heads, kvh, int8, dim, block_size, block_n, head_major) -> None:
    actual, expected = _run(
        device, SEQS, heads, kvh, dim, block_size, torch.float16, int8, block_n, head_major
    )
    torch.testing.assert_close(actual, expected, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, BF16_DOT])
@pytest.mark.parametrize("int8", [False, True], ids=["fp", "int8"])
def test_other_dtypes(device, dtype, int8) -> None:
    # float32 tl.dot runs in tf32 on GPUs, hence the tolerance.
    actual, expected = _run(device, [(18, 18), (40, 7)], 6, 2, 64, 16, dtype, int8, 16, True)
    torch.testing.assert_close(actual, expected, atol=2e-2, rtol=2e-2)
