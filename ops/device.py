"""Which device the engine runs on (CUDA when present, else CPU), and which kernels serve it."""

from __future__ import annotations

import torch

# The CPU features that decide the kernels (`kernel_paths`); printed with every benchmark.
CPU_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def kernel_paths(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """What runs each hot op of a `dtype` model on `device`, as chosen at start-up.

    Keys: gemm (the dense projections), gemm_int8 (W8A8's), attention, row_ops (norms,
    rotary, activation); on CPUs also cpu_flags (those of `CPU_FLAGS` present) and vec
    (the widest vector ISA the C++ kernels were built for).
    """
    if device.type == "cuda":
        return {"gemm": "cuBLAS", "gemm_int8": "triton", "attention": "triton", "row_ops": "triton"}
    from ops import cpu_kernels
    from ops.linear import gemm_kernel, gemm_weight_dtype, pack_kind
    from ops.quant import cpu_has_int8_gemm

    flags = cpu_kernels.cpu_flags()
    built = cpu_kernels.available()
    weight_dtype = gemm_weight_dtype(dtype, device)
    kind = pack_kind(torch.empty(0, dtype=weight_dtype))
    ours = {
        "amx": "our AMX kernel (kernels/cpu/gemm.cpp)",
        "avx512": "our AVX-512 dot-product kernel (kernels/cpu/gemm.cpp)",
        "avx512vnni": "our AVX-512 kernel (kernels/cpu/gemm.cpp: vpdpbusd for int8, FMA on widened bf16)",
        "avx2": "our AVX2 kernel (kernels/cpu/gemm.cpp: FMA on widened bf16, vpmaddubsw for int8)",
    }.get(gemm_kernel(), "")
    if kind == "headrace":
        gemm = ours
    elif kind == "onednn":
        gemm = "oneDNN, packed weights"
    elif weight_dtype != dtype:
        gemm = f"float32 GEMM on {str(dtype).removeprefix('torch.')}-valued weights (no native half GEMM)"
    else:
        gemm = f"torch {str(dtype).removeprefix('torch.')} GEMM"
    if ours:
        gemm_int8 = ours
    elif cpu_has_int8_gemm():
        gemm_int8 = "torch._int_mm (VNNI)"
    else:
        gemm_int8 = "float32 GEMM of the int8 codes (no VNNI)"
    cpp = "C++ kernels (kernels/cpu)" if built else "torch ops"
    return {
        "cpu_flags": " ".join(f for f in CPU_FLAGS if f in flags) or "(none of interest)",
        "vec": cpu_kernels.capability() if built else "-",
        "gemm": gemm,
        "gemm_int8": gemm_int8,
        "attention": cpp,
        "row_ops": cpp,
    }
