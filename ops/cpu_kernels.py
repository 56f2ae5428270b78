"""The CPU kernels (`kernels/cpu/*.cpp`): built once per machine, loaded on first use.

They are compiled for the host (`-march=native`, and the widest `at::vec` capability it has:
AVX512, AVX2 or scalar) with torch's own extension builder, into torch's extensions cache
(`$TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`) under a name that hashes the
sources, the flags and the CPU, so a changed file or another CPU model builds afresh and an
unchanged one loads in milliseconds. The first build takes about a minute on 2 cores.

`available()` is False where the build fails (no C++ compiler, say): ops then fall back to
their torch implementations, which compute the same values, more slowly; the failure is
logged once. HEADRACE_CPU_KERNELS=0 forces that fallback (to compare the two paths).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = (
    "attention.cpp",
    "decode_layers.cpp",
    "elementwise.cpp",
    "gemm.cpp",
    "logit_screen.cpp",
    "prefill_attention.cpp",
    "quant.cpp",
)
_SOURCE_DIR = Path(__file__).resolve().parent.parent / "kernels" / "cpu"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def vec_capability(flags: frozenset[str]) -> str:
    """The widest `at::vec` implementation the host can run: AVX512, AVX2 or DEFAULT."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX512"
    if {"avx2", "fma"} <= flags:
        return "AVX2"
    return "DEFAULT"


# HEADRACE_CPU_ISA builds for less than the host has, to check the narrower paths on a wider
# machine: "avx512vnni" (Cascade Lake: AVX-512 with VNNI, no BF16, no AMX), "avx2"
# (x86-64-v3: AVX2, FMA) or "scalar" (x86-64 baseline).
_ISA_OVERRIDES = {
    "avx512vnni": ("cascadelake", "AVX512"),
    "avx2": ("x86-64-v3", "AVX2"),
    "scalar": ("x86-64", "DEFAULT"),
}


def _target() -> tuple[str, str]:
    """(-march value, at::vec capability) of the build."""
    isa = os.environ.get("HEADRACE_CPU_ISA", "native")
    if isa in _ISA_OVERRIDES:
        return _ISA_OVERRIDES[isa]
    if isa != "native":
        raise ValueError(
            f"HEADRACE_CPU_ISA must be native, {', '.join(_ISA_OVERRIDES)}, got {isa!r}"
        )
    return "native", vec_capability(cpu_flags())


def _build_flags(march: str, capability: str) -> list[str]:
    flags = ["-O3", f"-march={march}", "-fopenmp"]
    # No fused multiply-adds the source does not ask for: the elementwise kernels then round
    # exactly as the torch ops they replace do in float32.
    flags.append("-ffp-contract=off")
    flags.append(f"-DCPU_CAPABILITY={capability}")
    if capability != "DEFAULT":
        flags.append(f"-DCPU_CAPABILITY_{capability}")
    return flags


@functools.cache
def load() -> bool:
    """Build (or find in the cache) and load the CPU kernels; False if that fails."""
    if os.environ.get("HEADRACE_CPU_KERNELS", "1") == "0":
        return False
    from torch.utils import cpp_extension

    march, capability = _target()
    cflags = _build_flags(march, capability)
    digest = hashlib.sha256()
    headers = sorted(p.name for p in _SOURCE_DIR.glob("*.h"))
    for name in (*SOURCES, *headers):
        digest.update((_SOURCE_DIR / name).read_bytes())
    digest.update(" ".join(cflags).encode())
    digest.update(" ".join(sorted(cpu_flags())).encode())
    digest.update(torch.__version__.encode())
    # Each checkout builds its own copy: the build files name the source paths, so two
    # checkouts sharing one build directory would rebuild it for each other.
    digest.update(str(_SOURCE_DIR.resolve()).encode())
    name = f"headrace_cpu_{digest.hexdigest()[:16]}"
    try:
        cpp_extension.load(
            name=name,
            sources=[str(_SOURCE_DIR / s) for s in SOURCES],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the torch ops
        log.warning("CPU kernels unavailable (%s); using the torch implementations", exc)
        return False
    log.info("CPU kernels loaded (%s, at::vec %s)", name, capability)
    return True


def capability() -> str:
    """The at::vec capability the kernels are built for: AVX512, AVX2 or DEFAULT."""
    return _target()[1]


def lanes() -> int:
    """float32 lanes of the kernels' vectors: 16 with AVX512, else 8."""
    return 16 if _target()[1] == "AVX512" else 8  # at::vec is 32 bytes wide below AVX512


def available() -> bool:
    """Whether `torch.ops.headrace_cpu` is there (building it on first call)."""
    return load()


def use_cpu_kernels(tensor: torch.Tensor) -> bool:
    """Run the C++ kernel for `tensor`'s op: CPU tensors, once the kernels are loaded."""
    return tensor.device.type == "cpu" and available()


@functools.cache
def has_bf16_prefill_attention() -> bool:
    """Whether the kernels were built with `paged_prefill_attention` (AVX512-BF16 hosts)."""
    return available() and bool(torch.ops.headrace_cpu.has_bf16_prefill_attention())


@functools.cache
def use_bf16_prefill_attention() -> bool:
    """Whether prefill attention should take that kernel: AVX512-BF16 hosts whose GEMMs run
    on vdpbf16ps, where it measured 1.1x end to end over SDPA. Not on AMX hosts (unmeasured
    there): SDPA's flash kernel multiplies its blocks on AMX tiles, and an earlier vector
    kernel of ours ran 2.8x slower than it on such a host (README, prefix caching)."""
    return has_bf16_prefill_attention() and torch.ops.headrace_cpu.gemm_kernel() != "amx"
