"""Compile every kernel launch for a real GPU target, without a GPU: `python -m tests.kernels.gpu_compile`.

The interpreter runs kernels as numpy and accepts code that the GPU compiler rejects (tl.dot
tiles under 16, loop-carried values changing type, unsupported control flow...). Here each
launcher runs on CPU tensors with TRITON_INTERPRET=0 and every `kernel[grid](...)` launch is
compiled through the NVIDIA backend (TTIR → TTGIR → LLVM → PTX → cubin with the bundled ptxas)
instead of being run. Prints one line per compiled kernel; exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction, mangle_type  # noqa: E402

LAUNCH_OPTIONS = ("num_warps", "num_stages")


@contextmanager
def compile_only(target: GPUTarget, compiled: list[str]) -> Iterator[None]:
    """Within the block, `kernel[grid](*args)` compiles for `target` instead of launching."""

    def run(self: JITFunction, *args: object, grid: object, warmup: bool, **kwargs: object) -> None:
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        values = dict(zip([p.name for p in self.params], args, strict=False)) | kwargs
        signature, constexprs = {}, {}
        for param in self.params:
            value = values[param.name]
            if param.is_constexpr or value is None:
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
            else:
                signature[param.name] = mangle_type(value)
        source = ASTSource(fn=self, signature=signature, constexprs=constexprs)
        kernel = triton.compile(source, target=target, options=options)
        assert "cubin" in kernel.asm
        compiled.append(f"{self.fn.__name__} {signature} {constexprs}")

    original = JITFunction.run
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = original


def launch_all(dtype: torch.dtype) -> None:
    """Every launcher once per variant (fp/int8 KV, split/whole decode, bias...), tiny shapes."""
    from kernels import (
        activation,
        int8_gemm,
        kv_cache,
        paged_attention,
        prefill_attention,
        rmsnorm_quant,
        rotary,
        w4a16_gemm,
    )
    from ops import quant_int4
    from ops.rotation import hadamard

    heads, kv_heads, dim, block_size = 6, 2, 64, 16
    key = torch.zeros(5, kv_heads, dim, dtype=dtype)
    query = torch.zeros(5, heads, dim, dtype=dtype)
    tables = torch.zeros(3, 4, dtype=torch.int64)
    lens = torch.ones(3, dtype=torch.int32)
    for int8 in (False, True):
        caches = [torch.zeros(8, block_size, kv_heads, dim, dtype=torch.int8 if int8 else dtype)
                  for _ in "kv"]  # fmt: skip
        scales = [torch.zeros(8, block_size, kv_heads, dtype=torch.float16) if int8 else None
                  for _ in "kv"]  # fmt: skip
        kv_cache.reshape_and_cache(key, key, *caches, torch.arange(5), *scales)
        for partition_size, block_n in ((512, 64), (32, 16)):
            paged_attention.paged_decode_attention(
                query[:3], *caches, tables, lens, 0.1, *scales,
                partition_size=partition_size, block_n=block_n,
            )  # fmt: skip
        cu_seqlens = torch.tensor([0, 5], dtype=torch.int32)
        prefill_attention.prefill_attention(
            query, key, key, *caches, cu_seqlens, lens[:1], tables[:1], 0.1, 5, *scales
        )
    a = torch.zeros(4, 64, dtype=torch.int8)
    int8_gemm.int8_gemm(a, torch.zeros(4), a, torch.zeros(4), torch.zeros(4, dtype=dtype), dtype)
    x = torch.zeros(4, 576, dtype=dtype)
    rmsnorm_quant.rmsnorm_quant(x, torch.zeros(576, dtype=dtype), 1e-5)
    rmsnorm_quant.per_token_quant(x)
    rmsnorm_quant.smooth_rotate_quant(x, torch.ones(576), hadamard(64))
    rmsnorm_quant.smooth_rotate_quant(x, None, hadamard(32))
    w = quant_int4.quantize_weight_int4(torch.zeros(64, 576), 128, torch.float16)
    w4a16_gemm.w4a16_gemm(x, w.packed, w.scales, w.zeros, 128, torch.zeros(64, dtype=dtype))
    w = quant_int4.quantize_weight_int4(torch.zeros(64, 576), 32, torch.float16, float_zeros=True)
    w4a16_gemm.w4a16_gemm(x, w.packed, w.scales, w.zeros, 32)  # 4 whole groups per tile
    w = quant_int4.quantize_weight_int4(torch.zeros(64, 576), 96, torch.float16)
    w4a16_gemm.w4a16_gemm(x, w.packed, w.scales, w.zeros, 96)  # groups straddle tiles
    activation.silu_and_mul(torch.zeros(4, 200, dtype=dtype))
    cos = torch.zeros(3, dim)
    rotary.apply_rotary(query[:3], key[:3], cos, cos)


def main() -> int:
    arch = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    compiled: list[str] = []
    with compile_only(GPUTarget("cuda", arch, 32), compiled):
        for dtype in (torch.bfloat16, torch.float16):
            launch_all(dtype)
    print("\n".join(compiled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
