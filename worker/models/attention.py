"""Attention metadata for one flattened step, and the paged attention layer that consumes it.

A step's tokens are laid out prefill chunks first, then one token per decoding
sequence; the layer writes all new K/V into the pages, then runs varlen
prefill attention on the first part and paged decode attention on the second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ops import attention as attn_ops


@dataclass(frozen=True)
class DecodeGroup:
    """Decode sequences [start, end) of the decode part, of similar context length.

    block_tables: [n, max_blocks] int64; mask: [n, 1, 1, max_blocks * block_size] bool.
    """

    start: int
    end: int
    block_tables: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs about a step; built once per step by the ModelRunner.

    slot_mapping: [num_tokens] int64 cache slot of each token.
    prefill_cu_seqlens: [num_prefills + 1] offsets of prefill chunks (python ints).
    prefill_context_lens: [num_prefills] cached tokens after this step (python ints).
    prefill_block_tables: [num_prefills, max_blocks] int64.
    decode_groups: decode sequences split by context length, so a short context is
        not padded to the longest one in the batch.
    """

    slot_mapping: torch.Tensor
    num_prefill_tokens: int
    prefill_cu_seqlens: list[int]
    prefill_context_lens: list[int]
    prefill_block_tables: torch.Tensor | None
    decode_groups: tuple[DecodeGroup, ...]
    workspace: attn_ops.DecodeWorkspace | None = None


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
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] → [T, H, D]."""
        key_cache, value_cache = kv_cache
        attn_ops.reshape_and_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        num_prefill = meta.num_prefill_tokens
        parts = []
        if num_prefill:
            parts.append(
                attn_ops.prefill_attention(
                    q[:num_prefill],
                    k[:num_prefill],
                    v[:num_prefill],
                    key_cache,
                    value_cache,
                    meta.prefill_cu_seqlens,
                    meta.prefill_context_lens,
                    meta.prefill_block_tables,
                    self.scale,
                )
            )
        decode_q = q[num_prefill:]
        for group in meta.decode_groups:
            parts.append(
                attn_ops.paged_decode_attention(
                    decode_q[group.start : group.end],
                    key_cache,
                    value_cache,
                    group.block_tables,
                    group.mask,
                    self.scale,
                    meta.workspace,
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)
