"""Every kernel variant compiles for an sm_90 GPU (H100/H200), checked on CPU-only machines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")

KERNELS = (
    "_reshape_and_cache_kernel",
    "_paged_decode_kernel",
    "_merge_partitions_kernel",
    "_prefill_kernel",
    "_int8_gemm_kernel",
    "_quant_row_kernel",
    "_w4a16_gemm_kernel",
    "_silu_and_mul_kernel",
    "_rotary_kernel",
)


@pytest.mark.slow
def test_all_kernels_compile_for_sm90() -> None:
    # A subprocess: kernels are decorated for the interpreter in this one.
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.gpu_compile", "90"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = [line.split()[0] for line in proc.stdout.splitlines() if line]
    assert set(compiled) == set(KERNELS), compiled
    # bf16 and fp16, fp and int8 KV, split and whole decode: distinct variants, each compiled.
    assert compiled.count("_paged_decode_kernel") == 8
