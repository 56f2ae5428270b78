"""KV projection: the peak of the pages a set of sequences holds over their predicted lifetimes."""

from __future__ import annotations

import random

from worker.engine.block_allocator import BlockAllocator
from worker.engine.kv_projection import RunningProjection, Span, peak_pages
from worker.engine.sequence import Request, Sequence
from worker.params import SamplingParams


def _exact_peak(spans: list[Span], block_size: int) -> int:
    """Step by step: sequence i holds ceil((n_i + t) / B) - shared_i pages while t <= d_i."""
    horizon = max(s.remaining for s in spans)
    return max(
        sum(-(-(s.num_tokens + t) // block_size) - s.shared for s in spans if t <= s.remaining)
        for t in range(horizon + 1)
    )


def test_peak_bounds_the_step_by_step_occupancy_tightly() -> None:
    rng = random.Random(0)
    for _ in range(200):
        spans = [
            Span(rng.randint(1, 300), rng.randint(0, 300), rng.randint(0, 2))
            for _ in range(rng.randint(1, 12))
        ]
        exact = _exact_peak(spans, 16)
        # An upper bound (ceil rounded up per sequence), at most one page per sequence over.
        assert exact <= peak_pages(spans, 16) <= exact + len(spans)


def test_sequences_that_finish_early_free_their_pages_for_later_growth() -> None:
    # 160 tokens each at the end (10 pages of 16): one finishes after 10 steps, the other
    # after 150, so they never hold 20 pages together.
    spans = [Span(150, 10), Span(10, 150)]
    assert _exact_peak(spans, 16) == 12  # at step 10: 10 pages + 2 pages
    assert peak_pages(spans, 16) == 13  # rounded up once per sequence
    assert peak_pages(spans, 16, pinned=3) == 16  # shared pages counted once, on top


def _running(allocator: BlockAllocator, name: str, prompt: int, predicted: int) -> Sequence:
    seq = Sequence(Request(name, tuple(range(prompt)), SamplingParams(max_tokens=predicted)))
    seq.block_ids = allocator.allocate(allocator.blocks_for(prompt))
    seq.predicted_num_tokens = prompt + predicted
    return seq


def test_steps_until_fits_waits_for_the_sequence_whose_pages_are_needed() -> None:
    allocator = BlockAllocator(12, 4, enable_caching=False)
    # a: 8 + 24 = 32 tokens (8 pages) in 24 steps; b: 4 + 4 tokens (2 pages) in 4 steps.
    projection = RunningProjection(
        allocator, [_running(allocator, "a", 8, 24), _running(allocator, "b", 4, 4)]
    )
    small, big = Span(4, 4), Span(8, 24)
    assert projection.peak_with(small) <= 12  # fits now
    assert projection.steps_until_fits(small, 12) == 0
    assert projection.peak_with(big) > 12
    assert projection.steps_until_fits(big, 12) == 24  # only once a has finished
