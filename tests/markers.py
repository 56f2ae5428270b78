"""Skip markers shared by test modules: what the host CPU or build cannot run."""

from __future__ import annotations

import pytest
import torch

from ops import cpu_kernels

needs_packed_gemm = pytest.mark.skipif(
    not (cpu_kernels.load() and torch.ops.headrace_cpu.gemm_kernel()),
    reason="this CPU (or build) has none of AMX, AVX512-VNNI + AVX512-BF16 and AVX2: the packed "
    "GEMMs (and the C++ decode loop over them) cannot run",
)

# A build that failed is not skipped (the tests then fail on it), only one without the kernel.
needs_bf16_prefill_attention = pytest.mark.skipif(
    cpu_kernels.load() and not cpu_kernels.has_bf16_prefill_attention(),
    reason="this CPU (or build) lacks AVX512-BF16: bf16 prefill attention runs on SDPA there",
)
