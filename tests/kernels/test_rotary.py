"""Triton rotary embedding against the torch op (the model's rotary, see test_engine_exact)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ops import rotary
from worker.models.rope import RotaryEmbedding

kernels = pytest.importorskip("kernels.rotary", reason="triton is not installed")


def _case(heads: int, kvh: int, dim: int, dtype, device):
    """q, k as views of a fused qkv output, and the gathered cos/sin rows of real RoPE tables."""
    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rope = RotaryEmbedding(config, dim, max_positions=4096)
    positions = torch.tensor([0, 1, 5, 100, 4095, 17, 17])
    gen = torch.Generator().manual_seed(10)
    qkv = torch.randn(len(positions), (heads + 2 * kvh) * dim, generator=gen).to(dtype)
    q, k, _ = qkv.split([heads * dim, kvh * dim, kvh * dim], dim=-1)
    q = q.view(-1, heads, dim)
    k = k.view(-1, kvh, dim)
    cos, sin = rope.cos_sin(positions, torch.float32)  # [T, 1, D]
    return rope, q, k, cos, sin, [t.to(device) for t in (q, k, cos.squeeze(1), sin.squeeze(1))]


@pytest.mark.parametrize("heads,kvh", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_matches_torch(device, heads, kvh, dim, dtype, tol) -> None:
    _, q, k, cos, sin, on_device = _case(heads, kvh, dim, dtype, device)
    q_out, k_out = kernels.apply_rotary(*on_device)
    # Reference in float32 (the kernel's math) from the same half-precision inputs.
    q_ref, k_ref = rotary.apply_rotary(q.float(), k.float(), cos, sin)
    assert q_out.dtype == dtype and q_out.shape == q.shape and k_out.shape == k.shape
    torch.testing.assert_close(q_out.cpu().float(), q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k_out.cpu().float(), k_ref, atol=tol, rtol=tol)
