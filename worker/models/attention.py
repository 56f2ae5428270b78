"""Attention metadata for one flattened step, and the paged attention layer that consumes it.

A step's tokens are laid out prefill chunks first, then one token per decoding
sequence; the layer writes all new K/V into the pages, then runs varlen
prefill attention on the first part and paged decode attention on the second.
Every op goes through `ops.kv_cache`, which picks the Triton kernel on CUDA and torch elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops import kv_cache as kv_ops
from ops.attention import DecodeWorkspace


@dataclass(frozen=True)
class LayerKVCache:
    """One layer's paged K/V pools (views of head-major storage).

    key, value: [num_blocks, block_size, num_kv_heads, head_dim] in the model dtype, or int8.
    key_scale, value_scale: [num_blocks, block_size, num_kv_heads] float16 for an int8 cache
    (one symmetric scale per token and kv head); None for a full-precision cache.
    """

    key: torch.Tensor
    value: torch.Tensor
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class DecodeGroup:
    """Decode sequences [start, end) of the decode part, of similar context length.

    block_tables: [n, max_blocks] int64; context_lens: [n] int32 (including the new token);
    mask: [n, 1, 1, max_blocks * block_size] bool, the CPU paths' view of context_lens.
    """

    start: int
    end: int
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs about a step; built once per step by the ModelRunner.

    slot_mapping: [num_tokens] int64 cache slot of each token.
    prefill_cu_seqlens: [num_prefills + 1] offsets of prefill chunks (python ints).
    prefill_context_lens: [num_prefills] cached tokens after this step (python ints).
    prefill_block_tables: [num_prefills, max_blocks] int64.
    prefill_lens_on_device: (cu_seqlens [P+1], context_lens [P]) int32 on the device, for
        the kernels (built once per step, not once per layer); None on CPU.
    decode_groups: decode sequences split by context length, so a short context is
        not padded to the longest one in the batch.
    """

    slot_mapping: torch.Tensor
    num_prefill_tokens: int
    prefill_cu_seqlens: list[int]
    prefill_context_lens: list[int]
    prefill_block_tables: torch.Tensor | None
    decode_groups: tuple[DecodeGroup, ...]
    workspace: DecodeWorkspace | None = None
    prefill_lens_on_device: tuple[torch.Tensor, torch.Tensor] | None = None


class PagedAttention(torch.nn.Module):
    """softmax(QKᵀ·scale)V over the paged cache for a mixed prefill/decode step."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: LayerKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] → [T, H, D]."""
        scales = (cache.key_scale, cache.value_scale)
        kv_ops.reshape_and_cache(k, v, cache.key, cache.value, meta.slot_mapping, *scales)
        num_prefill = meta.num_prefill_tokens
        parts = []
        if num_prefill:
            parts.append(
                kv_ops.prefill_attention(
                    q[:num_prefill],
                    k[:num_prefill],
                    v[:num_prefill],
                    cache.key,
                    cache.value,
                    meta.prefill_cu_seqlens,
                    meta.prefill_context_lens,
                    meta.prefill_block_tables,
                    self.scale,
                    *scales,
                    lens_on_device=meta.prefill_lens_on_device,
                )
            )
        decode_q = q[num_prefill:]
        for group in meta.decode_groups:
            parts.append(
                kv_ops.paged_decode_attention(
                    decode_q[group.start : group.end],
                    cache.key,
                    cache.value,
                    group.block_tables,
                    group.context_lens,
                    self.scale,
                    *scales,
                    workspace=meta.workspace,
                    mask=group.mask,
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)
