"""Triton `silu_and_mul`: the Llama MLP's gate, silu(gate) * up, over the fused gate_up output.

Reference: `ops.activation.silu_and_mul`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_xm,
    stride_om,
    inter_size,
    BLOCK: tl.constexpr,
):
    """Program (row, column block): out[row, cols] = silu(x[row, cols]) * x[row, I + cols]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter_size
    gate = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_xm + inter_size + cols, mask=mask, other=0.0)
    out = gate / (1.0 + tl.exp(-gate)) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """x: [..., 2 * I] (gate then up, unit last stride) → [..., I] in x's dtype, float32 math."""
    if x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"need an even last dim with unit stride, got {tuple(x.shape)}")
    inter_size = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], inter_size, dtype=x.dtype, device=x.device)
    if out.numel():
        block = min(block, triton.next_power_of_2(inter_size))
        grid = (rows.shape[0], triton.cdiv(inter_size, block))
        _silu_and_mul_kernel[grid](
            rows, out, rows.stride(0), out.stride(0), inter_size, BLOCK=block
        )
    return out.view(*x.shape[:-1], inter_size)
