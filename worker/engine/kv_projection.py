"""KV projection: the most pages a set of sequences will hold at once over their predicted lifetimes.

Predicted-length admission (`Scheduler`, `admission="predicted"`) asks whether a request
fits beside the running ones. Summing what every sequence will hold at its end (prompt plus
predicted output) answers it too cautiously: sequences finish at different times and free
their pages then, so the pool only has to hold the *peak* of the projected occupancy
(LightLLM's "past-future" scheduler). Decoding adds one token per step to each sequence, so
at `t` steps from now sequence i (n_i tokens now, d_i more predicted) holds
`ceil((n_i + t) / B)` pages while `t <= d_i`, and none after; the total over time peaks just
before one of them finishes, at some `t = d_j`. Pure Python, no tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.engine.block_allocator import BlockAllocator
    from worker.engine.sequence import Sequence as Seq


@dataclass(frozen=True)
class Span:
    """One sequence's projected KV: `num_tokens` now, `remaining` more predicted, and
    `shared` of its pages also held by others (counted once, in `peak_pages`' `pinned`)."""

    num_tokens: int
    remaining: int
    shared: int = 0


def peak_pages(spans: Iterable[Span], block_size: int, pinned: int = 0) -> int:
    """The most pages `spans` hold at once from now until the last one finishes, plus the
    `pinned` pages (shared prefixes, counted once and held throughout).

    Pages are counted as `(tokens + block_size - 1) / block_size` per sequence, an upper bound
    of its `ceil`, so that the sum over a set of sequences updates in O(1) per sequence:
    O(n log n) in all.
    """
    ordered = sorted(spans, key=lambda s: s.remaining, reverse=True)
    peak = 0.0
    tokens = 0  # Σ (num_tokens + block_size - 1 - shared * block_size) of the sequences alive
    alive = 0
    for i, span in enumerate(ordered):
        tokens += span.num_tokens + block_size - 1 - span.shared * block_size
        alive += 1
        # Evaluate once per distinct finishing time: the last of a run of equal `remaining`.
        if i + 1 < len(ordered) and ordered[i + 1].remaining == span.remaining:
            continue
        peak = max(peak, (tokens + alive * span.remaining) / block_size)
    return pinned + int(peak)


class RunningProjection:
    """The running sequences' projected KV during one admission pass (the scheduler's): each
    is predicted to run to its `predicted_num_tokens` (past it, or with none: one more token).
    Pages with several users (shared prefixes) are counted once and held throughout."""

    def __init__(self, allocator: BlockAllocator, running: Sequence[Seq]) -> None:
        self._allocator = allocator
        self._pinned: set[int] = set()
        self._spans: list[Span] = []
        for seq in running:
            self.add(seq)

    def add(self, seq: Seq) -> None:
        shared = self._allocator.shared(seq.block_ids)
        self._pinned.update(shared)
        remaining = max((seq.predicted_num_tokens or 0) - seq.num_tokens, 1)
        self._spans.append(Span(seq.num_tokens, remaining, len(shared)))

    def peak_with(self, span: Span) -> int:
        """Pages the running sequences and `span`, starting now, will hold at most at once."""
        return peak_pages([*self._spans, span], self._allocator.block_size, len(self._pinned))

    def steps_until_fits(self, span: Span, capacity: int) -> int:
        """About how many steps until `span` could start within `capacity` pages: a binary
        search over the running sequences' finishing times (the fit only changes when one
        finishes; it is taken as monotone in time, which holds up to rounding)."""
        times = sorted({0, *(s.remaining for s in self._spans)})
        block_size, pinned = self._allocator.block_size, len(self._pinned)

        def fits_at(t: int) -> bool:
            later = [
                Span(s.num_tokens + t, s.remaining - t, s.shared)
                for s in self._spans
                if s.remaining > t
            ]
            return peak_pages([*later, span], block_size, pinned) <= capacity

        low, high = 0, len(times) - 1  # at times[-1] every running sequence has finished
        while low < high:
            mid = (low + high) // 2
            if fits_at(times[mid]):
                high = mid
            else:
                low = mid + 1
        return times[low]
