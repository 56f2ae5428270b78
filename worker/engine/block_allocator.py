"""BlockAllocator: the paged KV cache's free list and reference counts (pure Python, no tensors)."""

from __future__ import annotations

from collections import deque


class BlockAllocator:
    """Hands out fixed-size KV pages by id.

    Check-then-commit: callers ask `can_allocate(n)` before `allocate(n)`, so a
    failed allocation never leaves a half-done state. Reference counts let a
    page be shared (a prefix used by several sequences); a page returns to the
    free list when its last user frees it.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(num_blocks)]
        for block_id in ids:
            self._ref_counts[block_id] = 1
        return ids

    def share(self, block_ids: list[int]) -> None:
        """Add a user to pages that are already allocated."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                raise RuntimeError(f"block {block_id} is not allocated")
            self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        # Reversed so that the most recently used pages are reused last, which
        # keeps a just-preempted sequence's pages intact as long as possible.
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            if count == 0:
                raise RuntimeError(f"double free of block {block_id}")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free.append(block_id)
