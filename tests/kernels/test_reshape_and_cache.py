"""Triton reshape_and_cache (fp copy and int8 quantize-on-write) against the torch writes."""

from __future__ import annotations

import pytest
import torch

from ops import attention as fp_ops
from ops import kv_cache as kv_ops

kernels = pytest.importorskip("kernels.kv_cache", reason="triton is not installed")


def _inputs(num_tokens: int, block_size: int, kvh: int, dim: int, dtype, device):
    gen = torch.Generator().manual_seed(1)
    num_blocks = -(-num_tokens // block_size) + 2
    # Scattered slots across pages, not in order, some pages only partly filled.
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(device)
    key = (torch.randn(num_tokens, kvh, dim, generator=gen) * 3).to(dtype).to(device)
    value = torch.randn(num_tokens, kvh, dim, generator=gen).to(dtype).to(device)
    key[0] = 0  # an all-zero token: the scale floor, not a division by zero
    return key, value, slots, (num_blocks, block_size, kvh, dim)


@pytest.mark.parametrize(
    "dtype,block_size,kvh,dim",
    [(torch.float16, 16, 1, 64), (torch.bfloat16, 32, 3, 128), (torch.float32, 16, 2, 128)],
)
def test_fp_cache_matches_torch(device, dtype, block_size: int, kvh: int, dim: int) -> None:
    key, value, slots, shape = _inputs(21, block_size, kvh, dim, dtype, device)
    expected = [fp_ops.allocate_kv_cache(*shape, dtype, device).fill_(7) for _ in range(2)]
    actual = [t.clone() for t in expected]
    fp_ops.reshape_and_cache(key, value, *expected, slots)
    kernels.reshape_and_cache(key, value, *actual, slots)
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "dtype,scale_dtype,block_size,kvh,dim",
    [
        (torch.float16, torch.float16, 16, 2, 64),
        (torch.bfloat16, torch.float32, 32, 3, 128),
        (torch.bfloat16, torch.float16, 16, 8, 64),
    ],
)
def test_int8_cache_matches_torch(
    device, dtype, scale_dtype, block_size: int, kvh: int, dim: int
) -> None:
    # Strided key/value: views into a fused projection output, as the model produces them.
    key, value, slots, shape = _inputs(21, block_size, kvh, dim, dtype, device)
    fused = torch.cat((key, value), dim=1)
    key, value = fused[:, :kvh], fused[:, kvh:]
    # Head-major pools (the engine's) for the codes, token-major ones for the scales.
    caches = [fp_ops.allocate_kv_cache(*shape, torch.int8, device).fill_(5) for _ in range(2)]
    scales = [torch.full(shape[:3], 0.5, dtype=scale_dtype, device=device) for _ in range(2)]
    expected = [t.clone() for t in caches + scales]
    kv_ops.reshape_and_cache_int8(key, value, *expected, slots)
    kernels.reshape_and_cache(key, value, *caches, slots, *scales)
    torch.testing.assert_close(scales, expected[2:], atol=0, rtol=2**-10)
    for actual, want in zip(caches, expected[:2], strict=True):
        diff = (actual.int() - want.int()).abs()
        # Codes may differ by one step where x / scale lands on a rounding tie.
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    block, offset = divmod(int(slots[0]), block_size)
    assert (caches[0][block, offset] == 0).all()  # the all-zero token


def test_int8_cache_needs_scale_pools(device) -> None:
    key, value, slots, shape = _inputs(3, 16, 1, 64, torch.float16, device)
    caches = [torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(2)]
    with pytest.raises(ValueError, match="scale"):
        kernels.reshape_and_cache(key, value, *caches, slots)
