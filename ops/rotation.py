"""Block Hadamard rotation of a projection's input: spreads activation outliers across
channels before per-token int8 quantization (as in QuaRot/SpinQuant, here blockwise).

A single huge channel sets a token's int8 step and wipes out its other channels. Rotating
`x` by an orthogonal `R` (and the weight by the same `R`, offline) leaves `x @ Wᵀ =
(x R) @ (W R)ᵀ` unchanged while spreading each outlier over the block. `R` is block-diagonal
with normalized Sylvester Hadamard blocks of `block` channels: symmetric, `R @ R = I`, and
`block` multiply-adds per element, which is small beside the projection's own `N`.

Plain torch on every device (a batched matmul): there is no kernel to dispatch to.
"""

from __future__ import annotations

import functools

import torch

MAX_BLOCK = 64


def rotation_block(in_features: int, max_block: int = MAX_BLOCK) -> int:
    """The largest power of two ≤ `max_block` that divides `in_features` (1: no rotation)."""
    if max_block < 1 or max_block & (max_block - 1):
        raise ValueError(f"the rotation block must be a power of two, got {max_block}")
    block = max_block
    while in_features % block:
        block //= 2
    return block


@functools.cache
def _hadamard(block: int, device: torch.device) -> torch.Tensor:
    # Cached per device: the forward pass of every rotated projection asks for it, and a
    # fresh host-to-device copy each time would stall a GPU step.
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / block**0.5).float().to(device)


def hadamard(block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix: [block, block] float32, symmetric, H @ H = I.

    Cached: do not modify the returned tensor.
    """
    if block < 1 or block & (block - 1):
        raise ValueError(f"a Hadamard block must be a power of two, got {block}")
    return _hadamard(block, torch.device(device))


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """x: [..., K] → x @ R in float32, R = blockdiag(H_block) (K divisible by block).

    Used for activations (`x R`) and for weights [N, K] (`W R`) alike.
    """
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"K = {k} is not a multiple of the rotation block {block}")
    if block == 1:
        return x.float()
    h = hadamard(block, x.device)
    return (x.float().reshape(*x.shape[:-1], k // block, block) @ h).reshape(x.shape)


def rotate_hessian(hessian: torch.Tensor, block: int) -> torch.Tensor:
    """Σ xᵀx of the inputs → Σ (xR)ᵀ(xR) = R H R: [K, K] → [K, K] float32."""
    return rotate(rotate(hessian, block).t(), block).t()
