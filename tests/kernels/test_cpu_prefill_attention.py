"""The AVX512-BF16 prefill attention kernel (`kernels/cpu/prefill_attention.cpp`) against
float32 causal attention over the same cached K/V (bf16 pages, or int8 codes times their
scales), and its dispatch from `ops.kv_cache`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ops import cpu_kernels
from ops import kv_cache as kv_ops
from tests.kernels.paged_data import make_paged_kv
from tests.markers import needs_bf16_prefill_attention

pytestmark = needs_bf16_prefill_attention


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    # The skip above is for CPUs without AVX512-BF16; a build that fails must not pass as one.
    assert cpu_kernels.load(), "the CPU kernels did not build (see the log)"


def _expected(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """query [n, H, D] at the last n of the m cached positions; k, v [m, KVH, D] → [n, H, D]."""
    n, m = query.shape[0], k.shape[0]
    mask = torch.arange(m)[None, :] <= torch.arange(m - n, m)[:, None]
    out = F.scaled_dot_product_attention(
        query.float().transpose(0, 1),
        k.float().transpose(0, 1),
        v.float().transpose(0, 1),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)


def _run(
    lengths: list[int],
    chunks: list[int],
    heads: int,
    kv_heads: int,
    dim: int,
    block_size: int = 16,
    poison: bool = False,
    int8: bool = False,
) -> None:
    paged = make_paged_kv(
        lengths,
        block_size,
        kv_heads,
        dim,
        torch.bfloat16,
        int8,
        torch.device("cpu"),
        head_major=True,
        token_minor_keys=True,
    )
    if poison:  # stale slots after each sequence's last token
        for n, table in zip(lengths, paged.block_tables.tolist(), strict=True):
            if n % block_size:
                page = table[(n - 1) // block_size]
                for pool in (paged.key_cache, paged.value_cache):
                    pool[page, n % block_size :] = 127 if int8 else float("nan")
                for pool in (paged.key_scales, paged.value_scales) if int8 else ():
                    pool[page, n % block_size :] = float("nan")
    gen = torch.Generator().manual_seed(7)
    query = torch.randn(sum(chunks), heads, dim, generator=gen).to(torch.bfloat16)
    cu = [0]
    for c in chunks:
        cu.append(cu[-1] + c)
    scale = dim**-0.5
    keys = torch.cat([k[n - c :] for k, n, c in zip(paged.keys, lengths, chunks, strict=True)])
    values = torch.cat([v[n - c :] for v, n, c in zip(paged.values, lengths, chunks, strict=True)])
    out = kv_ops.prefill_attention(
        query,
        keys,
        values,
        paged.key_cache,
        paged.value_cache,
        cu,
        lengths,
        paged.block_tables,
        scale,
        paged.key_scales,
        paged.value_scales,
    )
    assert out.shape == query.shape and out.dtype == torch.bfloat16
    direct = torch.ops.headrace_cpu.paged_prefill_attention(
        query,
        paged.key_cache,
        paged.value_cache,
        paged.block_tables,
        torch.tensor(cu),
        torch.tensor(lengths),
        scale,
        paged.key_scales,
        paged.value_scales,
    )
    if cpu_kernels.use_bf16_prefill_attention():  # not on AMX hosts, which keep SDPA
        assert torch.equal(out, direct), "ops.kv_cache did not take the kernel"
    tol = 2 * torch.finfo(torch.bfloat16).eps
    for i in range(len(lengths)):
        k, v = paged.dequantized(i)
        expected = _expected(query[cu[i] : cu[i + 1]], k, v, scale)
        torch.testing.assert_close(direct[cu[i] : cu[i + 1]].float(), expected, rtol=tol, atol=tol)


# Whole prompts (chunk == context), chunks after a cached prefix (ending mid-page, on a page
# boundary), single-token chunks, and a chunk longer than one tile.
LENGTHS = [1, 16, 17, 40, 100, 203]
CHUNKS = [1, 16, 5, 40, 33, 150]


INT8 = pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])


@INT8
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4), (8, 2), (10, 2), (16, 2), (14, 2)])
def test_matches_causal_attention_over_the_pages(heads: int, kv_heads: int, int8: bool) -> None:
    _run(LENGTHS, CHUNKS, heads, kv_heads, 64, int8=int8)


@INT8
@pytest.mark.parametrize("dim", [32, 96, 128])
def test_head_dims(dim: int, int8: bool) -> None:
    _run(LENGTHS, CHUNKS, 6, 2, dim, int8=int8)


@INT8
@pytest.mark.parametrize("block_size", [16, 32])
def test_slots_past_the_context_never_reach_the_output(block_size: int, int8: bool) -> None:
    _run(LENGTHS, CHUNKS, 9, 3, 64, block_size, poison=True, int8=int8)


def test_a_query_gets_the_same_result_whatever_chunk_it_arrives_in() -> None:
    """Chunked prefill: the last 30 positions as one chunk or as the tail of the whole prompt
    give bit-identical outputs (keys in the same blocks, in the same order)."""
    paged = make_paged_kv(
        [90], 16, 3, 64, torch.bfloat16, False, torch.device("cpu"), head_major=True,
        token_minor_keys=True,
    )  # fmt: skip
    query = torch.randn(90, 9, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)

    def attend(q: torch.Tensor) -> torch.Tensor:
        return torch.ops.headrace_cpu.paged_prefill_attention(
            q, paged.key_cache, paged.value_cache, paged.block_tables,
            torch.tensor([0, q.shape[0]]), torch.tensor([90]), 0.125,
        )  # fmt: skip

    assert torch.equal(attend(query)[60:], attend(query[60:]))
