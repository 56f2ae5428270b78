"""BlockAllocator: the paged KV cache's free list, reference counts and prefix cache
(pure Python, no tensors)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

# A full page's prefix-cache key: (hash of the previous page's key, or 0 for the first
# page; the page's token ids). Equal keys mean equal KV content: same tokens at the same
# positions after the same prefix (one model per engine). The tokens are kept in the key
# so a lookup compares them exactly; only the chain to the parent goes through a hash.
BlockKey = tuple[int, tuple[int, ...]]


def block_key(parent: BlockKey | None, token_ids: Sequence[int]) -> BlockKey:
    """The key of a full page holding `token_ids`, after the page keyed `parent`."""
    return (0 if parent is None else hash(parent), tuple(token_ids))


class BlockAllocator:
    """Hands out fixed-size KV pages by id, and keeps freed full pages findable by content.

    Check-then-commit: callers ask `can_allocate(n)` before `allocate(n)`, so a
    failed allocation never leaves a half-done state. Reference counts let a
    page be shared (a prefix used by several sequences).

    Prefix caching (vLLM-style): a full page whose K/V are written can be `cache`d under
    its `BlockKey`; `match` finds the longest run of cached pages for a chain of keys and
    `share` takes a reference on them. A page whose last user frees it stays cached (and
    free: it counts in `num_free_blocks`) until `allocate` needs it: pages never cached go
    first, then cached ones, least recently freed first. Referenced pages are never evicted.

    Args:
        num_blocks: pages in the pool.
        block_size: tokens per page.
        enable_caching: False → `cache` is a no-op and `match` finds nothing.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free: deque[int] = deque(range(num_blocks))  # unreferenced, not cached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, cached; LRU first
        self._ref_counts = [0] * num_blocks
        self._block_of: dict[BlockKey, int] = {}
        self._key_of: dict[int, BlockKey] = {}

    @property
    def num_free_blocks(self) -> int:
        """Pages `allocate` can hand out: never-cached free pages plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Pages findable by `match` (referenced or not)."""
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise RuntimeError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        ids = []
        for _ in range(num_blocks):
            if self._free:
                block_id = self._free.popleft()
            else:  # evict the least recently freed cached page
                block_id, _ = self._evictable.popitem(last=False)
                del self._block_of[self._key_of.pop(block_id)]
            self._ref_counts[block_id] = 1
            ids.append(block_id)
        return ids

    def share(self, block_ids: list[int]) -> None:
        """Add a user to pages that are allocated, or cached (reviving them from the free pool)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                if block_id not in self._evictable:
                    raise RuntimeError(f"block {block_id} is not allocated")
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        # Reversed so that a sequence's last pages are evicted first: its first pages are the
        # ones another request (or itself, after a preemption) is most likely to find again.
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id]
            if count == 0:
                raise RuntimeError(f"double free of block {block_id}")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                if block_id in self._key_of:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)

    # -- prefix cache ---------------------------------------------------------------

    def cache(self, block_id: int, key: BlockKey) -> None:
        """Make allocated page `block_id`, full and written, findable under `key`.

        A key already cached elsewhere (two sequences computed the same page) keeps its
        first page; this one stays private and is freed as usual.
        """
        if not self.enable_caching or key in self._block_of or block_id in self._key_of:
            return
        if self._ref_counts[block_id] == 0:
            raise RuntimeError(f"block {block_id} is not allocated")
        self._block_of[key] = block_id
        self._key_of[block_id] = key

    def match(self, keys: Sequence[BlockKey]) -> list[int]:
        """Ids of the cached pages for the longest prefix of `keys` (no side effects)."""
        ids: list[int] = []
        for key in keys:
            block_id = self._block_of.get(key)
            if block_id is None:
                break
            ids.append(block_id)
        return ids

    def num_unreferenced(self, block_ids: Sequence[int]) -> int:
        """How many of `block_ids` sit in the free pool (sharing them uses up free pages)."""
        return sum(1 for block_id in block_ids if self._ref_counts[block_id] == 0)

    def shared(self, block_ids: Sequence[int]) -> list[int]:
        """Those of `block_ids` that have more than one user (a shared prefix)."""
        return [block_id for block_id in block_ids if self._ref_counts[block_id] > 1]
