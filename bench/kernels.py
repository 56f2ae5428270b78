"""Kernel micro-benchmarks on a CUDA GPU: TFLOP/s and GB/s of each op against torch and the roofline.

    python -m bench.kernels [--model smollm2|llama3-8b] [--json]

Every op is called through `ops/` (which sends CUDA tensors to the Triton kernels), next to
the torch baseline of the same work: cuBLAS bf16 matmul, `torch._int_mm`, SDPA (flash) over
contiguous K/V, eager torch for the elementwise ops. `roofline` is the time the GPU's peak
compute or memory bandwidth allows for the op (whichever binds) over the measured time.
CPU-only machines exit with a message: the kernels are checked there by
`pytest tests/kernels` under TRITON_INTERPRET=1.

NOTE: ~310 lines: one benchmark per op, each a few lines, in one list.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

# name fragment → (dense bf16 TFLOP/s, dense int8 TOP/s, memory GB/s); first match wins.
PEAKS = (
    ("H200", (989.0, 1979.0, 4800.0)),
    ("H100 PCIe", (756.0, 1513.0, 2000.0)),
    ("H100 NVL", (835.0, 1671.0, 3900.0)),
    ("H100", (989.0, 1979.0, 3350.0)),
    ("A100", (312.0, 624.0, 2039.0)),
    ("L40S", (362.0, 733.0, 864.0)),
    ("A10", (125.0, 250.0, 600.0)),
)
# hidden, intermediate, heads, kv heads, head_dim
MODELS = {"smollm2": (576, 1536, 9, 3, 64), "llama3-8b": (4096, 14336, 32, 8, 128)}


@dataclass(frozen=True)
class Result:
    op: str
    impl: str
    shape: str
    ms: float
    tflops: float
    gbs: float
    roofline: float | None  # fraction of the roofline time, None when the GPU is unknown


@dataclass(frozen=True)
class Peaks:
    tflops: float
    tops: float
    gbs: float

    def seconds(self, flops: float, nbytes: float, int8: bool = False) -> float:
        compute = flops / ((self.tops if int8 else self.tflops) * 1e12)
        return max(compute, nbytes / (self.gbs * 1e9))


class Bench:
    """Times callables with `triton.testing.do_bench` and collects Results."""

    def __init__(self, peaks: Peaks | None) -> None:
        self.peaks = peaks
        self.results: list[Result] = []

    def run(
        self,
        op: str,
        impl: str,
        shape: str,
        fn: Callable[[], object],
        flops: float,
        nbytes: float,
        int8: bool = False,
    ) -> None:
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        seconds = ms * 1e-3
        roof = self.peaks.seconds(flops, nbytes, int8) / seconds if self.peaks else None
        self.results.append(
            Result(op, impl, shape, ms, flops / seconds / 1e12, nbytes / seconds / 1e9, roof)
        )


def bench_gemms(bench: Bench, model: tuple[int, ...], device: torch.device) -> None:
    from ops import quant, quant_int4
    from ops.rotation import rotate, rotation_block

    hidden, inter, heads, kv_heads, head_dim = model
    qkv = (heads + 2 * kv_heads) * head_dim
    shapes = {"qkv": (hidden, qkv), "o": (heads * head_dim, hidden)}
    shapes |= {"gate_up": (hidden, 2 * inter), "down": (inter, hidden)}
    for m in (1, 16, 128, 1024):
        for name, (k, n) in shapes.items():
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
            w8 = quant.quantize_weight_int8(w)
            w4 = quant_int4.quantize_weight_int4(w, 128, torch.bfloat16)
            w4g32 = quant_int4.quantize_weight_int4(w, 32, torch.bfloat16, float_zeros=True)
            x_q, x_scale = quant.per_token_quant(x)
            label, flops = f"{name} M={m} K={k} N={n}", 2.0 * m * n * k
            out_bytes = m * n * 2
            bench.run("linear", "cublas bf16", label, lambda x=x, w=w: F.linear(x, w),
                      flops, 2 * (m * k + n * k) + out_bytes)  # fmt: skip
            if m > 16 and k % 8 == 0 and n % 8 == 0:  # torch._int_mm's CUDA constraints
                wt = w8.qweight.t()
                bench.run("linear", "torch._int_mm", label,
                          lambda a=x_q, b=wt: torch._int_mm(a, b),
                          flops, m * k + n * k + m * n * 4, int8=True)  # fmt: skip
            gemm_args = (x_q, x_scale, w8.qweight, w8.scale)
            bench.run("linear", "int8_gemm", label,
                      lambda a=gemm_args: quant.int8_gemm(*a),
                      flops, m * k + n * k + out_bytes + 4 * (m + n), int8=True)  # fmt: skip
            bench.run("linear", "w8a8 (quant+gemm)", label,
                      lambda x=x, w8=w8: quant.w8a8_linear(x, w8),
                      flops, 2 * m * k + n * k + out_bytes, int8=True)  # fmt: skip
            # As the model runs it: SmoothQuant division and Hadamard rotation fused into the
            # activation quantization; "unfused" is the same as five eager torch ops first.
            smooth, block = torch.rand(k, device=device) + 0.5, rotation_block(k)
            bench.run("linear", "w8a8 served", label,
                      lambda x=x, w8=w8, s=smooth, b=block: quant.w8a8_linear(x, w8, None, s, b),
                      flops, 2 * m * k + n * k + out_bytes, int8=True)  # fmt: skip
            bench.run("linear", "w8a8 served unfused", label,
                      lambda x=x, w8=w8, s=smooth, b=block: quant.w8a8_linear(
                          rotate(x.float() / s, b), w8).to(x.dtype),
                      flops, 2 * m * k + n * k + out_bytes, int8=True)  # fmt: skip
            if k % 2 == 0:
                for impl, packed, group, zero_bytes in (
                    ("w4a16_gemm", w4, 128, 1),
                    ("w4a16_gemm g32", w4g32, 32, 4),
                ):
                    groups = -(-k // group)
                    bench.run("linear", impl, label,
                              lambda x=x, w=packed: quant_int4.w4a16_gemm(x, w),
                              flops, 2 * m * k + n * k // 2 + (2 + zero_bytes) * n * groups
                              + out_bytes)  # fmt: skip


def _paged(
    num_seqs: int,
    context: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    int8: bool,
    device: torch.device,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], torch.Tensor]:
    """Head-major caches holding `context` tokens for each sequence, pages in shuffled order."""
    from ops import attention as fp_ops
    from ops import kv_cache as kv_ops

    pages = -(-context // block_size)
    num_blocks = num_seqs * pages
    dtype = torch.int8 if int8 else torch.bfloat16
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [fp_ops.allocate_kv_cache(*shape, dtype, device) for _ in range(2)]
    for c in caches:
        if int8:
            c.copy_(torch.randint(-100, 100, shape, device=device, dtype=torch.int8))
        else:
            c.copy_(torch.randn(shape, device=device, dtype=torch.bfloat16))
    scales = (
        [kv_ops.allocate_kv_scales(*shape[:3], torch.float16, device).fill_(0.02) for _ in "kv"]
        if int8
        else [None, None]
    )
    tables = torch.randperm(num_blocks, device=device).view(num_seqs, pages)
    return caches, scales, tables


def bench_attention(bench: Bench, model: tuple[int, ...], device: torch.device) -> None:
    from ops import kv_cache as kv_ops

    _, _, heads, kv_heads, head_dim = model
    scale = head_dim**-0.5
    for num_seqs, context in ((64, 1024), (16, 4096), (4, 32768)):
        lens = torch.full((num_seqs,), context, dtype=torch.int32, device=device)
        q = torch.randn(num_seqs, heads, head_dim, device=device, dtype=torch.bfloat16)
        label = f"decode S={num_seqs} L={context} H={heads}/{kv_heads} D={head_dim}"
        flops = 4.0 * num_seqs * heads * context * head_dim
        kv_elems = 2 * num_seqs * context * kv_heads * head_dim
        for int8 in (False, True):
            caches, scales, tables = _paged(num_seqs, context, kv_heads, head_dim, 16, int8, device)
            args = (q, *caches, tables, lens, scale, *scales)
            nbytes = kv_elems * (1 if int8 else 2) + (kv_elems // head_dim * 2 if int8 else 0)
            bench.run("decode attention", "paged int8" if int8 else "paged bf16", label,
                      lambda a=args: kv_ops.paged_decode_attention(*a), flops, nbytes)  # fmt: skip
        k = torch.randn(num_seqs, kv_heads, context, head_dim, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q4 = q.unsqueeze(2)
        bench.run("decode attention", "sdpa contiguous bf16", label,
                  lambda q4=q4, k=k, v=v: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True),
                  flops, kv_elems * 2)  # fmt: skip

    for num_seqs, chunk, prefix in ((8, 1024, 0), (4, 512, 3584)):
        context = prefix + chunk
        label = f"prefill S={num_seqs} chunk={chunk} prefix={prefix}"
        # Causal: each query sees the prefix and half the chunk on average.
        flops = 4.0 * num_seqs * heads * head_dim * chunk * (prefix + (chunk + 1) / 2)
        q = torch.randn(num_seqs * chunk, heads, head_dim, device=device, dtype=torch.bfloat16)
        kv = [torch.randn(num_seqs * chunk, kv_heads, head_dim, device=device, dtype=q.dtype)
              for _ in "kv"]  # fmt: skip
        cu = [i * chunk for i in range(num_seqs + 1)]
        for int8 in (False, True):
            caches, scales, tables = _paged(num_seqs, context, kv_heads, head_dim, 16, int8, device)
            args = (q, *kv, *caches, cu, [context] * num_seqs, tables, scale, *scales)
            nbytes = 2 * q.numel() * 2 + 2 * num_seqs * prefix * kv_heads * head_dim
            bench.run("prefill attention", "paged int8" if int8 else "paged bf16", label,
                      lambda a=args: kv_ops.prefill_attention(*a), flops, nbytes)  # fmt: skip
        qd = q.view(num_seqs, chunk, heads, head_dim).transpose(1, 2)
        kd = torch.randn(num_seqs, kv_heads, context, head_dim, device=device, dtype=q.dtype)
        mask = None
        if prefix:
            pos = torch.arange(context, device=device)
            mask = pos[None, :] <= pos[prefix:, None]
        bench.run("prefill attention", "sdpa contiguous bf16", label,
                  lambda qd=qd, kd=kd, mask=mask: F.scaled_dot_product_attention(
                      qd, kd, kd, attn_mask=mask, is_causal=mask is None, enable_gqa=True),
                  flops, 2 * q.numel() * 2 + 2 * kd.numel() * 2)  # fmt: skip


def bench_elementwise(bench: Bench, model: tuple[int, ...], device: torch.device) -> None:
    from ops import activation, attention, kv_cache, quant, rotary

    hidden, inter, heads, kv_heads, head_dim = model
    t = 4096
    bf16 = {"device": device, "dtype": torch.bfloat16}
    x = torch.randn(t, hidden, **bf16)
    w = torch.ones(hidden, **bf16)
    nbytes = t * hidden * 3 + t * 4
    bench.run("rmsnorm_quant", "triton", f"T={t} K={hidden}",
              lambda: quant.rmsnorm_quant(x, w, 1e-5), 0, nbytes)  # fmt: skip
    bench.run("rmsnorm_quant", "torch eager", f"T={t} K={hidden}",
              lambda: quant.quantize_symmetric(F.rms_norm(x.float(), (hidden,), w.float(), 1e-5)),
              0, nbytes)  # fmt: skip
    gate_up = torch.randn(t, 2 * inter, **bf16)
    nbytes = t * inter * 6
    bench.run("silu_and_mul", "triton", f"T={t} I={inter}",
              lambda: activation.silu_and_mul(gate_up), 0, nbytes)  # fmt: skip
    bench.run("silu_and_mul", "torch eager", f"T={t} I={inter}",
              lambda: F.silu(gate_up[:, :inter]) * gate_up[:, inter:], 0, nbytes)  # fmt: skip
    q = torch.randn(t, heads, head_dim, **bf16)
    k = torch.randn(t, kv_heads, head_dim, **bf16)
    cos, sin = torch.randn(t, head_dim, device=device), torch.randn(t, head_dim, device=device)
    nbytes = 4 * (q.numel() + k.numel()) + 8 * cos.numel()
    bench.run("rotary", "triton", f"T={t}", lambda: rotary.apply_rotary(q, k, cos, sin), 0, nbytes)
    half = head_dim // 2
    bench.run("rotary", "torch eager", f"T={t}",
              lambda: (q * cos[:, None] + torch.cat((-q[..., half:], q[..., :half]), -1) * sin[:, None],
                       k * cos[:, None] + torch.cat((-k[..., half:], k[..., :half]), -1) * sin[:, None]),
              0, nbytes)  # fmt: skip
    num_blocks, slots = t // 16 + 1, torch.randperm(t, device=device)
    shape = (num_blocks, 16, kv_heads, head_dim)
    for int8 in (False, True):
        caches = [attention.allocate_kv_cache(*shape, torch.int8 if int8 else torch.bfloat16, device)
                  for _ in "kv"]  # fmt: skip
        scales = [kv_cache.allocate_kv_scales(*shape[:3], torch.float16, device) if int8 else None
                  for _ in "kv"]  # fmt: skip
        nbytes = 2 * k.numel() * (2 + (1 if int8 else 2))
        bench.run("reshape_and_cache", "triton int8" if int8 else "triton bf16", f"T={t}",
                  lambda c=caches, s=scales: kv_cache.reshape_and_cache(k, k, *c, slots, *s),
                  0, nbytes)  # fmt: skip


def _peaks(args: argparse.Namespace) -> Peaks | None:
    if args.peak_tflops and args.peak_tops and args.peak_gbs:
        return Peaks(args.peak_tflops, args.peak_tops, args.peak_gbs)
    name = torch.cuda.get_device_name()
    for fragment, peaks in PEAKS:
        if fragment in name:
            return Peaks(*peaks)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--only", choices=("gemm", "attention", "elementwise"))
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s (unknown GPUs)")
    parser.add_argument("--peak-tops", type=float, help="dense int8 TOP/s (unknown GPUs)")
    parser.add_argument("--peak-gbs", type=float, help="memory GB/s (unknown GPUs)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.kernels needs a CUDA GPU and found none; on CPU the kernels are checked by "
              "`pytest tests/kernels` under TRITON_INTERPRET=1.", file=sys.stderr)  # fmt: skip
        return 2
    torch.manual_seed(0)
    device = torch.device("cuda")
    bench = Bench(_peaks(args))
    model = MODELS[args.model]
    suites = {"gemm": bench_gemms, "attention": bench_attention, "elementwise": bench_elementwise}
    for name, suite in suites.items():
        if args.only in (None, name):
            suite(bench, model, device)
    if args.json:
        for r in bench.results:
            print(json.dumps(asdict(r)))
        return 0
    print(f"{torch.cuda.get_device_name()}, model shapes: {args.model}\n")
    print("| op | impl | shape | ms | TFLOP/s | GB/s | roofline |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in bench.results:
        roof = f"{r.roofline:.0%}" if r.roofline is not None else "n/a"
        print(
            f"| {r.op} | {r.impl} | {r.shape} | {r.ms:.4f} | {r.tflops:.1f} | {r.gbs:.0f} | {roof} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
