"""Linear-layer micro-benchmark at a model's projection shapes: W8A8 and W4A16 against the
unquantized layer, on whatever device the engine runs on (CPU here; `bench/kernels.py`
has the GPU roofline view).

Each implementation is the engine's own path, on the weight copies the engine packs once at
load: `ops.linear.linear` for the model dtype (float32 weights where no kernel of ours or the
CPU's multiplies bf16), `ops.quant.w8a8_linear` (per-token activation quantization + int8 GEMM), "w8a8-served" (the same after the input's smoothing
division and Hadamard rotation, as `W8A8Linear` runs it) and `ops.quant_int4.w4a16_gemm`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ops import quant, quant_int4
from ops.linear import gemm_weight_dtype, linear, packed_weight
from ops.rotation import rotate, rotation_block


@dataclass(frozen=True)
class LinearResult:
    projection: str  # qkv, o, gate_up, down
    tokens: int  # M
    in_features: int
    out_features: int
    impl: str  # "bf16", "w8a8", "w4a16"
    ms: float
    speedup: float  # unquantized ms / this ms (1.0 for the unquantized row)

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def projection_shapes(args: object) -> dict[str, tuple[int, int]]:
    """name → (in_features K, out_features N) of a decoder layer's fused projections."""
    hidden, heads = args.hidden_size, args.num_heads  # type: ignore[attr-defined]
    kv, head_dim = args.num_kv_heads, args.head_dim  # type: ignore[attr-defined]
    inter = args.intermediate_size  # type: ignore[attr-defined]
    return {
        "qkv": (hidden, (heads + 2 * kv) * head_dim),
        "o": (heads * head_dim, hidden),
        "gate_up": (hidden, 2 * inter),
        "down": (inter, hidden),
    }


def time_ms(fn: Callable[[], object], device: torch.device, min_s: float = 0.2) -> float:
    """Median of repeated timings (CUDA synchronized), after a warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    samples: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_s or len(samples) < 5:
        t = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t)
    samples.sort()
    return samples[len(samples) // 2] * 1e3


@torch.inference_mode()
def bench_linear(
    shapes: dict[str, tuple[int, int]],
    tokens: list[int],
    dtype: torch.dtype,
    device: torch.device,
    schemes: tuple[str, ...] = ("w8a8", "w8a8-served", "w4a16"),
) -> list[LinearResult]:
    gen = torch.Generator().manual_seed(0)
    results = []
    for name, (k, n) in shapes.items():
        w = (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
        dense = w.to(gemm_weight_dtype(dtype, device)).to(device)
        # The engine packs each dense weight once at load (ops.linear.packed_weight): without
        # the packed copy a bf16 GEMM on an AVX2 CPU is oneDNN's emulation, ~10x slower.
        packed = packed_weight(dense)
        impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            str(dtype).removeprefix("torch."): lambda x, dense=dense, packed=packed: linear(
                x, dense, None, packed
            )
        }
        if "w8a8" in schemes:
            w8 = quant.quantize_weight_int8(w.to(device))
            p8 = quant.packed_int8_weight(w8.qweight)
            impls["w8a8"] = lambda x, w8=w8, p8=p8: quant.w8a8_linear(x, w8, packed=p8)
        if "w8a8-served" in schemes:  # as the model runs it: x / smooth, rotation, then W8A8
            block, smooth = rotation_block(k), torch.ones(k, device=device)
            w8r = quant.quantize_weight_int8(rotate(w.to(device), block))
            p8r = quant.packed_int8_weight(w8r.qweight)

            impls["w8a8-served"] = lambda x, w8r=w8r, block=block, smooth=smooth, p8r=p8r: (
                quant.w8a8_linear(x, w8r, None, smooth, block, p8r)
            )
        if "w4a16" in schemes:
            w4 = quant_int4.quantize_weight_int4(w.to(device).float(), 128, dtype)
            impls["w4a16"] = lambda x, w4=w4: quant_int4.w4a16_gemm(x, w4)
        for m in tokens:
            x = torch.randn(m, k, generator=gen).to(dtype).to(device)
            base = None
            for impl, fn in impls.items():
                ms = time_ms(lambda fn=fn, x=x: fn(x), device)
                base = base or ms
                results.append(LinearResult(name, m, k, n, impl, ms, base / ms))
    return results


def format_table(results: list[LinearResult]) -> str:
    rows = [
        "| projection | M | K | N | impl | ms | speedup vs unquantized |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.projection} | {r.tokens} | {r.in_features} | {r.out_features} | {r.impl} "
            f"| {r.ms:.3f} | {r.speedup:.2f}x |"
        )
    return "\n".join(rows)
