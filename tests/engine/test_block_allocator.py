"""BlockAllocator: free list and reference counts, without a model."""

import pytest

from worker.engine.block_allocator import BlockAllocator


def test_allocate_and_free_returns_every_block() -> None:
    alloc = BlockAllocator(num_blocks=8, block_size=16)
    a = alloc.allocate(3)
    b = alloc.allocate(5)
    assert len(set(a) | set(b)) == 8
    assert not alloc.can_allocate(1)
    alloc.free(a)
    alloc.free(b)
    assert alloc.num_free_blocks == 8


def test_allocate_more_than_free_raises_without_side_effects() -> None:
    alloc = BlockAllocator(num_blocks=4, block_size=16)
    alloc.allocate(3)
    with pytest.raises(RuntimeError):
        alloc.allocate(2)
    assert alloc.num_free_blocks == 1


def test_shared_block_is_freed_by_its_last_user() -> None:
    alloc = BlockAllocator(num_blocks=2, block_size=16)
    ids = alloc.allocate(1)
    alloc.share(ids)
    alloc.free(ids)
    assert alloc.num_free_blocks == 1
    alloc.free(ids)
    assert alloc.num_free_blocks == 2
    with pytest.raises(RuntimeError):
        alloc.free(ids)


def test_blocks_for_rounds_up() -> None:
    alloc = BlockAllocator(num_blocks=2, block_size=16)
    assert [alloc.blocks_for(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]
