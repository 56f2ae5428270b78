"""The C++ CPU kernels (`kernels/cpu`) against their torch references.

Cache writes (codes and scales included) are bit-exact; the row kernels match exactly in
float32 and within one rounding of the output dtype in bf16/fp16 (they compute in float32
and round once, where the references round after every op, as HF does); attention matches
SDPA over the gathered pages to float32 accumulation error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ops import attention as fp_ops
from ops import cpu_kernels, sampling
from ops import kv_cache as kv_ops
from ops.rotary import rotate_half
from tests.kernels.paged_data import make_paged_kv
from tests.markers import needs_packed_gemm

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    # Not a skip: a machine that runs the tests has a C++ compiler, and a build that fails
    # there is a bug to see.
    assert cpu_kernels.load(), "the CPU kernels did not build (see the log)"


def ops() -> object:
    return torch.ops.headrace_cpu


def ulp_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal in float32; within one rounding step of `dtype` elsewhere."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
        return
    eps = torch.finfo(dtype).eps
    diff = (actual.float() - expected.float()).abs()
    bound = eps * expected.float().abs().clamp_min(1e-2) + 1e-3
    assert bool((diff <= bound).all()), f"max diff {diff.max().item()}"


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_rms_norm_matches_the_model_norm(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 576, generator=gen) * 3).to(dtype)
    weight = (torch.rand(576, generator=gen) + 0.5).to(dtype)
    ulp_close(ops().rms_norm(x, weight, 1e-5), reference_rms_norm(x, weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_fused_add_rms_norm_updates_both_in_place(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 96, generator=gen).to(dtype)
    residual = torch.randn(9, 96, generator=gen).to(dtype)
    weight = (torch.rand(96, generator=gen) + 0.5).to(dtype)
    expected_sum = x + residual
    expected = reference_rms_norm(expected_sum, weight, 1e-6)
    ops().fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(residual, expected_sum)
    ulp_close(x, expected, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_rotary_rotates_strided_heads_in_place(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    tokens, heads, kv_heads, dim = 11, 6, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    table = torch.randn(100, dim, generator=gen).to(dtype)
    sin_table = torch.randn(100, dim, generator=gen).to(dtype)
    positions = torch.randint(0, 100, (tokens,), generator=gen)
    cos, sin = table[positions].unsqueeze(1).float(), sin_table[positions].unsqueeze(1).float()
    # The kernel's arithmetic: float32, rounded once.
    expected_q = (q.float() * cos + rotate_half(q.float()) * sin).to(dtype)
    expected_k = (k.float() * cos + rotate_half(k.float()) * sin).to(dtype)
    ops().rotary_embedding(q, k, positions, table, sin_table)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)


@pytest.mark.parametrize("dtype", FLOATS)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 2 * 1536, generator=gen) * 4).to(dtype)
    gate, up = x.float().chunk(2, dim=-1)
    expected = (F.silu(gate) * up).to(dtype)
    ulp_close(ops().silu_and_mul(x), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [False, True], ids=["fp", "int8"])
@pytest.mark.parametrize("token_minor", [False, True], ids=["token-major", "token-minor"])
def test_reshape_and_cache_is_bit_exact(dtype: torch.dtype, int8: bool, token_minor: bool) -> None:
    gen = torch.Generator().manual_seed(4)
    blocks, block_size, kv_heads, dim = 6, 16, 3, 64
    shape = (blocks, block_size, kv_heads, dim)
    cache_dtype = torch.int8 if int8 else dtype
    cpu = torch.device("cpu")
    pools = [
        fp_ops.allocate_kv_cache(*shape, cache_dtype, cpu, token_minor=token_minor)
        for _ in range(4)
    ]
    scales = [
        kv_ops.allocate_kv_scales(*shape[:3], torch.float16, torch.device("cpu")) if int8 else None
        for _ in range(4)
    ]
    key = (torch.randn(20, kv_heads, dim, generator=gen) * 2).to(dtype)
    value = torch.randn(20, kv_heads, dim, generator=gen).to(dtype)
    key[3] = 0  # an all-zero row takes the floor scale
    slots = torch.randperm(blocks * block_size, generator=gen)[:20]
    kv_ops.reshape_and_cache(key, value, pools[0], pools[1], slots, scales[0], scales[1])
    ops().reshape_and_cache(key, value, pools[2], pools[3], slots, scales[2], scales[3])
    assert torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3])
    if int8:
        assert torch.equal(scales[0], scales[2]) and torch.equal(scales[1], scales[3])


def test_reshape_and_cache_skips_negative_slots() -> None:
    pool = torch.zeros(2, 4, 1, 8)
    other = torch.zeros(2, 4, 1, 8)
    x = torch.ones(2, 1, 8)
    ops().reshape_and_cache(x, x, pool, other, torch.tensor([5, -1]))
    assert pool.sum() == 8 and pool[1, 1].sum() == 8


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("int8", [False, True], ids=["fp", "int8"])
@pytest.mark.parametrize("token_minor", [False, True], ids=["token-major", "token-minor"])
@pytest.mark.parametrize("dim", [64, 40])
def test_paged_decode_attention_matches_sdpa_over_the_pages(
    dtype: torch.dtype, int8: bool, token_minor: bool, dim: int
) -> None:
    _check_decode_attention(dtype, int8, token_minor, dim, heads=6)


# The register-blocked path (token-minor keys) tiles by GQA ratio: 1-3 query heads per kv
# head take 4 slices / vectors at once, 4-6 take 2, 7-8 take 1; 96 dims leave a remainder
# after the 4-vector blocks.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [False, True], ids=["fp", "int8"])
@pytest.mark.parametrize("heads", [2, 6, 10, 16])
@pytest.mark.parametrize("dim", [64, 96])
def test_paged_decode_attention_gqa_ratios(
    dtype: torch.dtype, int8: bool, heads: int, dim: int
) -> None:
    _check_decode_attention(dtype, int8, True, dim, heads)


@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_decode_attention_ignores_slots_past_the_context(block_size: int) -> None:
    """Slots after a sequence's last token (stale data of an earlier sequence, here NaN)
    never reach its output, though the key pass reads whole 16-token slices."""
    _check_decode_attention(torch.bfloat16, False, True, 64, 6, block_size, poison=True)


def _check_decode_attention(
    dtype: torch.dtype,
    int8: bool,
    token_minor: bool,
    dim: int,
    heads: int,
    block_size: int = 16,
    poison: bool = False,
) -> None:
    lengths = [1, 15, 16, 17, 70, 203]
    kv_heads = 2
    paged = make_paged_kv(
        lengths,
        block_size,
        kv_heads,
        dim,
        dtype,
        int8,
        torch.device("cpu"),
        head_major=True,
        token_minor_keys=token_minor,
    )
    if poison:
        for n, table in zip(lengths, paged.block_tables.tolist(), strict=True):
            if n % block_size:  # the rest of the last page
                page = table[(n - 1) // block_size]
                paged.key_cache[page, n % block_size :] = float("nan")
                paged.value_cache[page, n % block_size :] = float("nan")
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype)
    context_lens = torch.tensor(lengths, dtype=torch.int32)
    scale = dim**-0.5
    out = ops().paged_decode_attention(
        query,
        paged.key_cache,
        paged.value_cache,
        paged.block_tables,
        context_lens,
        scale,
        paged.key_scales,
        paged.value_scales,
    )
    assert out.shape == query.shape and out.dtype == dtype
    for i in range(len(lengths)):
        k, v = paged.dequantized(i)  # [n, KVH, D] float32, as cached
        expected = F.scaled_dot_product_attention(
            query[i].float().unsqueeze(1),  # [H, 1, D]
            k.transpose(0, 1),
            v.transpose(0, 1),
            scale=scale,
            enable_gqa=True,
        ).squeeze(1)
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(out[i].float(), expected, rtol=tol, atol=tol)


# -- Packed GEMMs (AMX, AVX-512 or AVX2 drivers), and W8A8's activation quantization -----------


@needs_packed_gemm
@pytest.mark.parametrize(("n", "k"), [(960, 576), (50, 100), (576, 1536)])
# 157 rows: several row blocks of the AVX2 driver (12 chunks each), the last one partial.
@pytest.mark.parametrize("m", [1, 3, 16, 17, 40, 157])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_bf16_linear_matches_float_math(m: int, n: int, k: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(6)
    w = (torch.randn(n, k, generator=gen) / k**0.5).bfloat16()
    x = torch.randn(m, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    out = ops().packed_linear_bf16(x, ops().pack_bf16(w), n, b)
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    # float32 accumulation in another order, then one bf16 rounding.
    ulp_close(out, expected, torch.bfloat16)


@needs_packed_gemm
@pytest.mark.parametrize(("inner", "k"), [(1536, 576), (48, 100)])
@pytest.mark.parametrize("m", [1, 17, 40, 157])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_gate_up_with_silu_equals_the_two_steps(
    inner: int, k: int, m: int, bias: bool
) -> None:
    from ops.activation import silu_and_mul
    from ops.linear import gated_packed_weight, linear, linear_silu, packed_weight

    gen = torch.Generator().manual_seed(12)
    weight = torch.randn(2 * inner, k, generator=gen).bfloat16()
    b = torch.randn(2 * inner, generator=gen).bfloat16() if bias else None
    x = torch.randn(m, k, generator=gen).bfloat16()
    gated = gated_packed_weight(weight)
    assert gated is not None
    out = linear_silu(x, weight, b, gated)
    # Same roundings in the same order: gate and up to bf16, then silu_and_mul's float32 ops.
    assert torch.equal(out, silu_and_mul(linear(x, weight, b, packed_weight(weight))))


@needs_packed_gemm
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("m", [1, 17, 40, 157])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_w8a8_gate_up_with_silu_equals_the_two_steps(
    dtype: torch.dtype, m: int, bias: bool
) -> None:
    from ops.activation import silu_and_mul
    from ops.quant import (
        packed_int8_gated,
        packed_int8_weight,
        quantize_weight_int8,
        w8a8_linear,
        w8a8_linear_silu,
    )

    gen = torch.Generator().manual_seed(13)
    weight = quantize_weight_int8(torch.randn(2 * 1536, 576, generator=gen))
    b = torch.randn(2 * 1536, generator=gen).to(dtype) if bias else None
    smooth = torch.rand(576, generator=gen) + 0.5
    x = torch.randn(m, 576, generator=gen).to(dtype)
    gated = packed_int8_gated(weight.qweight)
    assert gated is not None
    out = w8a8_linear_silu(x, weight, b, smooth, 64, gated)
    two_steps = w8a8_linear(x, weight, b, smooth, 64, packed_int8_weight(weight.qweight))
    assert torch.equal(out, silu_and_mul(two_steps))


@needs_packed_gemm
@pytest.mark.parametrize(("n", "k"), [(960, 576), (50, 100), (576, 1536)])
@pytest.mark.parametrize("m", [1, 12, 17, 40, 157])
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_packed_int8_linear_is_bit_exact(m: int, n: int, k: int, out_dtype: torch.dtype) -> None:
    from ops.quant import int8_gemm, quantize_symmetric

    gen = torch.Generator().manual_seed(7)
    wq, ws = quantize_symmetric(torch.randn(n, k, generator=gen))
    xq, xs = quantize_symmetric(torch.randn(m, k, generator=gen) * 3)
    bias = torch.randn(n, generator=gen).to(out_dtype)
    out = ops().packed_linear_int8(xq, xs, ops().pack_int8(wq), ws, n, bias, out_dtype)
    # int32 sums are exact, and the epilogue is the reference's float ops in its order.
    assert torch.equal(out, int8_gemm(xq, xs, wq, ws, bias, out_dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rotation", [1, 64])
@pytest.mark.parametrize("smoothed", [False, True])
def test_quantize_rows_matches_the_torch_quantizer(
    dtype: torch.dtype, rotation: int, smoothed: bool
) -> None:
    from ops.quant import quantize_symmetric
    from ops.rotation import rotate

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(33, 576, generator=gen).to(dtype)
    x[:, 7] *= 40  # an outlier channel
    x[5] = 0
    smooth = torch.rand(576, generator=gen) + 0.5 if smoothed else None
    x32 = x.float() / smooth if smoothed else x.float()
    codes_ref, scale_ref = quantize_symmetric(rotate(x32, rotation) if rotation > 1 else x32)
    codes, scale = ops().quantize_rows(x, smooth, rotation)
    # The kernel multiplies by reciprocals where the reference divides, and its transform sums
    # in another order than the reference's matmul: scales agree to float32 rounding, and a
    # code moves by one only where a value sat on a rounding edge.
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    diff = (codes.int() - codes_ref.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3


@pytest.mark.parametrize("dtype", FLOATS)
def test_argmax_rows_picks_the_first_maximum_like_torch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(6, 49152, generator=gen).to(dtype)
    x[1, 10] = x[1, 20] = 1e4  # a tie: the first wins
    x[2, 33] = float("nan")  # NaN counts as the maximum
    x[3] = 0
    assert torch.equal(ops().argmax_rows(x), x.argmax(-1))


def test_sample_rows_inverts_the_cdf_like_the_reference() -> None:
    """The same token as softmax + cumsum + searchsorted wherever u is not within float
    rounding of a CDF step; masked (-inf) tokens never; the ends of u stay inside the mass."""
    gen = torch.Generator().manual_seed(11)
    rows, vocab = 64, 49152 + 5  # a vocabulary that is not a whole number of vectors
    x = torch.randn(rows, vocab, generator=gen) * 4
    x[:, 1::3] = float("-inf")
    x[0, :-1], x[0, -1] = float("-inf"), 1.0  # one token left: always it
    x[1, 1:], x[1, 0] = float("-inf"), -3.0
    temps = torch.rand(rows, generator=gen) * 2 + 0.05
    u = torch.rand(rows, generator=gen)
    u[2], u[3], u[4] = 0.0, 1.0 - 2**-24, 1.0  # some RNG backends return 1.0
    got = ops().sample_rows(x, temps.reciprocal(), u)
    ref = sampling.sample_rows_reference(x, temps, u)
    cdf = torch.softmax(x / temps.unsqueeze(1), dim=-1).cumsum(-1)
    target = u * cdf[:, -1]
    near = (cdf - target.unsqueeze(1)).abs().min(-1).values < 1e-5
    assert bool(((got == ref) | near).all()), (got != ref).nonzero().flatten().tolist()
    assert int(near.sum()) < rows // 4  # the comparison above is not vacuous
    assert bool(torch.isfinite(x.gather(1, got.unsqueeze(1))).all())
    assert got[0] == vocab - 1 and got[1] == 0
    assert got[2] == torch.isfinite(x[2]).nonzero()[0, 0]
    assert got[3] <= torch.isfinite(x[3]).nonzero()[-1, 0]
    assert got[4] == torch.isfinite(x[4]).nonzero()[-1, 0]


def test_sample_rows_draws_the_softmax_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf"), 0.5]])
    draws = 20000
    u = torch.rand(draws, generator=torch.Generator().manual_seed(3))
    x = logits.expand(draws, -1).contiguous()
    tokens = ops().sample_rows(x, torch.full((draws,), 1 / 0.7), u)
    freq = torch.bincount(tokens, minlength=5).float() / draws
    expected = torch.softmax(logits[0] / 0.7, -1)
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx512vnni", "avx2", "scalar"])
def test_narrower_builds_pass_these_tests(isa: str) -> None:
    """The kernels built for less than this host has (HEADRACE_CPU_ISA), as on the CPUs this
    project also runs on, pass the same tests (their AMX ones skip): AVX-512 with VNNI but
    not BF16 (Cascade Lake, Ice Lake: bf16 GEMMs on FMAs), AVX2, baseline x86-64."""
    import os
    import subprocess
    import sys

    flags = cpu_kernels.cpu_flags()
    wide = cpu_kernels.vec_capability(flags) == "AVX512"
    if isa == "avx512vnni" and not (wide and "avx512_vnni" in flags):
        pytest.skip("this host cannot run an AVX-512 VNNI build")
    if isa == "avx512vnni" and not flags & {"avx512_bf16", "amx_tile"}:
        pytest.skip("this host's own build is the AVX-512 VNNI one, tested above")
    if isa == "avx2" and not wide:
        pytest.skip("this host's own build is the AVX2 one, tested above")
    env = {**os.environ, "HEADRACE_CPU_ISA": isa}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", __file__]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@needs_packed_gemm
@pytest.mark.parametrize("route", ["dot", "fma"])
def test_both_bf16_gemm_routes_pass_the_gemm_tests(route: str) -> None:
    """AVX512-BF16 hosts pick vdpbf16ps or FMAs on widened bf16 by their issue rates
    (gemm::bf16_on_fma); HEADRACE_CPU_BF16 forces either, and both pass the bf16 GEMM tests."""
    import os
    import subprocess
    import sys

    # has_bf16_prefill_attention: this build has AVX512-BF16 (not so under HEADRACE_CPU_ISA).
    if not cpu_kernels.has_bf16_prefill_attention() or ops().gemm_kernel() == "amx":
        pytest.skip("only the AVX-512 driver of an AVX512-BF16 build has both routes")
    env = {**os.environ, "HEADRACE_CPU_BF16": route}
    kind = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, ops.cpu_kernels as k; k.load(); "
            "print(torch.ops.headrace_cpu.gemm_kernel())",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout.split()
    assert kind and kind[-1] == {"dot": "avx512", "fma": "avx512vnni"}[route]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-k", "packed and bf16 or gate_up", __file__]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
