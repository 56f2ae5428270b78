"""The CPU (torch) paths of the int8 KV cache against naive float attention."""

from __future__ import annotations

import pytest
import torch

from ops import attention as fp_ops
from ops import kv_cache as kv_ops
from tests.kernels.paged_data import make_paged_kv

CPU = torch.device("cpu")


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int) -> torch.Tensor:
    """float64 attention. q: [n, H, D] at positions offset..offset+n-1; k, v: [offset+n, KVH, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * q.shape[-1] ** -0.5
    allowed = torch.arange(k.shape[0])[None, :] <= (torch.arange(q.shape[0]) + offset)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).float()


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_kv_error_is_half_a_step(scale_dtype) -> None:
    x = torch.randn(11, 3, 64, generator=torch.Generator().manual_seed(12)) * 5
    x[2, 1] = 0
    codes, scale = kv_ops.quantize_kv(x, scale_dtype)
    assert codes.dtype == torch.int8 and scale.shape == (11, 3) and scale.dtype == scale_dtype
    error = (codes.float() * scale.float().unsqueeze(-1) - x).abs()
    # Half a step, plus the clamp at ±127 when the stored scale rounded down.
    assert (error <= scale.float().unsqueeze(-1) * 0.51 + x.abs() * 2**-8).all()
    assert (codes[2, 1] == 0).all()


def test_reshape_and_cache_int8_writes_only_its_slots() -> None:
    key = torch.randn(5, 2, 64, generator=torch.Generator().manual_seed(17))
    caches = [fp_ops.allocate_kv_cache(4, 16, 2, 64, torch.int8, CPU).fill_(3) for _ in range(2)]
    scales = [kv_ops.allocate_kv_scales(4, 16, 2, torch.float16, CPU).fill_(0.25) for _ in range(2)]
    slots = torch.tensor([17, 3, 63, 40, 0])
    kv_ops.reshape_and_cache(key, key * 2, *caches, slots, *scales)
    codes, scale = kv_ops.quantize_kv(key * 2)
    blocks, offsets = slots // 16, slots % 16
    assert torch.equal(caches[1][blocks, offsets], codes)
    assert torch.equal(scales[1][blocks, offsets], scale)
    untouched = torch.ones(4, 16, dtype=torch.bool)
    untouched[blocks, offsets] = False
    assert (caches[0][untouched] == 3).all() and (scales[0][untouched] == 0.25).all()


@pytest.mark.parametrize("heads,kvh", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("head_major", [False, True])
def test_paged_decode_int8_equals_attention_over_dequantized_kv(
    heads, kvh, dtype, tol, head_major
) -> None:
    lengths = [1, 17, 40]
    paged = make_paged_kv(lengths, 16, kvh, 32, dtype, True, CPU, head_major=head_major)
    q = torch.randn(len(lengths), heads, 32, generator=torch.Generator().manual_seed(13)).to(dtype)
    lens = torch.tensor(lengths)
    out = kv_ops.paged_decode_attention(
        q, paged.key_cache, paged.value_cache, paged.block_tables, lens, 32**-0.5,
        paged.key_scales, paged.value_scales,
    )  # fmt: skip
    for i, n in enumerate(lengths):
        k, v = paged.dequantized(i)
        expected = _naive(q[i : i + 1], k, v, offset=n - 1)
        torch.testing.assert_close(out[i : i + 1].float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("heads,kvh", [(4, 4), (6, 2)])
def test_prefill_int8_reads_prefix_from_pages_and_chunk_in_full_precision(heads, kvh) -> None:
    lengths, chunks = [9, 30], [9, 9]  # a fresh prompt; a chunk after a 21-token prefix
    paged = make_paged_kv(lengths, 8, kvh, 16, torch.float32, True, CPU)
    q = torch.randn(sum(chunks), heads, 16, generator=torch.Generator().manual_seed(14))
    key = torch.cat([k[-c:] for k, c in zip(paged.keys, chunks, strict=True)])
    value = torch.cat([v[-c:] for v, c in zip(paged.values, chunks, strict=True)])
    out = kv_ops.prefill_attention(
        q, key, value, paged.key_cache, paged.value_cache, [0, 9, 18], lengths,
        paged.block_tables, 16**-0.5, paged.key_scales, paged.value_scales,
    )  # fmt: skip
    for i, (n, c) in enumerate(zip(lengths, chunks, strict=True)):
        k_pages, v_pages = paged.dequantized(i)
        k = torch.cat((k_pages[: n - c], paged.keys[i][n - c :]))
        v = torch.cat((v_pages[: n - c], paged.values[i][n - c :]))
        expected = _naive(q[9 * i : 9 * i + c], k, v, offset=n - c)
        torch.testing.assert_close(out[9 * i : 9 * i + c], expected, atol=1e-5, rtol=1e-5)


def test_fp_caches_match_the_attention_ops() -> None:
    # On CPU the dispatcher runs the C++ kernel (float32 accumulation in another order than
    # SDPA's), elsewhere the attention ops themselves.
    paged = make_paged_kv([5, 20], 16, 2, 32, torch.float32, False, CPU)
    q = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(15))
    lens = torch.tensor([5, 20])
    mask = kv_ops.decode_mask(lens, paged.block_tables.shape[1] * 16)
    args = (paged.key_cache, paged.value_cache, paged.block_tables)
    torch.testing.assert_close(
        kv_ops.paged_decode_attention(q, *args, lens, 32**-0.5),
        fp_ops.paged_decode_attention(q, *args, mask, 32**-0.5),
        atol=1e-6,
        rtol=1e-6,
    )


def test_int8_kv_attention_stays_close_to_full_precision() -> None:
    """The accuracy cost of the scheme itself: int8 pages vs the original K/V."""
    lengths = [300]
    paged = make_paged_kv(lengths, 16, 2, 64, torch.float32, True, CPU)
    q = (
        torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(16)) * 2
    )  # sharp-ish attention, where K errors matter most
    out = kv_ops.paged_decode_attention(
        q, paged.key_cache, paged.value_cache, paged.block_tables, torch.tensor(lengths),
        64**-0.5, paged.key_scales, paged.value_scales,
    )  # fmt: skip
    expected = _naive(q, paged.keys[0], paged.values[0], offset=299)
    rel = (out - expected).norm() / expected.norm()
    assert rel < 0.02, rel
