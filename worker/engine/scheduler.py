"""Scheduler: decides which tokens of which sequences go into the next forward pass.

There is no prefill phase and no decode phase (as in vLLM v1): every sequence
has `num_computed_tokens` and `num_tokens`, and each step hands out tokens
under one budget — running sequences first (a decode is one token, an
unfinished prefill gets a chunk), then waiting ones. When the KV pool runs dry
a running sequence is preempted and later recomputed.

Priority: both queues are ordered by effective priority (highest first), then arrival
(oldest first). Effective priority = the request's priority + one per
`priority_aging_s` seconds since it arrived, so old work eventually outranks any newer
work (no starvation). Waiting sequences are admitted in that order; the preemption victim
is the last running one: lowest effective priority, newest among equals.

Admission (`SchedulerConfig.admission`): "fcfs" admits a waiting sequence when its next chunk
fits with a 1% watermark to spare; "predicted" admits it only when its prompt plus predicted
output (`LengthPredictor`) fits beside what the running sequences are predicted to still
need, so they rarely outgrow the pool and get preempted. A sequence that outgrows its
prediction still runs; preemption remains the safety net.

Prefix caching: a sequence's full, computed pages are offered to the allocator's cache
(each step and when it leaves); a sequence being admitted starts from the longest run of
cached pages matching its tokens, counted as computed, so only the rest is prefilled.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import attrgetter

from worker.config import SchedulerConfig
from worker.engine.block_allocator import BlockAllocator
from worker.engine.kv_projection import RunningProjection, Span
from worker.engine.length_predictor import LengthPredictor
from worker.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_new_tokens` tokens of `seq`, starting at `seq.num_computed_tokens`."""

    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Sequence, ...]
    finished: tuple[Sequence, ...]  # could not fit in the whole KV cache: finished as "length"

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


class Scheduler:
    # Keep a few pages free when admitting new sequences so running ones can
    # grow for a while without immediately preempting the newcomer.
    WATERMARK = 0.01
    # Waiting sequences looked at per step (predicted admission's backfill scans past the head).
    BACKFILL_WINDOW = 64

    def __init__(
        self,
        config: SchedulerConfig,
        allocator: BlockAllocator,
        predictor: LengthPredictor | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._clock = clock  # the arrival times' clock (tests pass a fake one)
        self.allocator = allocator
        # Consulted only under predicted admission; whoever sees requests finish feeds it.
        self.predictor = predictor if predictor is not None else LengthPredictor()
        self._predicted = config.admission == "predicted"
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._watermark_blocks = int(self.WATERMARK * allocator.num_blocks)
        self.num_preemptions = 0
        # Tokens prefilled again when preempted sequences are readmitted (less cache hits).
        self.num_recomputed_tokens = 0
        # Prefix cache totals, in tokens, counted at each admission (a resumed sequence again).
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    def reset_counters(self) -> None:
        """Zero the cumulative totals (after the engine's warm-up request)."""
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished and return its pages to the pool at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        # A request that made the engine fail leaves nothing in the prefix cache.
        self._release(seq, cache=reason != "error")
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        finished: list[Sequence] = []
        for seq in self.running:
            self._cache_pages(seq)
        now = self._clock()

        # Running sequences first, by rank; preempt from the end (lowest rank).
        self.running = self._by_rank(self.running, now)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._grow(seq, num_new):
                victim = self.running[-1]
                if victim is seq and i == 0:
                    # Alone and still too long for the whole pool: it can never run.
                    self.finish(seq, "length")
                    finished.append(seq)
                    break
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                chunks.append(ScheduledChunk(seq, num_new))
                budget -= num_new
                i += 1
            # NOTE: on `break` seq left `running` (finished or preempted), so index i
            # already points at the next sequence.

        # Then waiting sequences by rank, while they fit (preempted ones included).
        self.waiting = deque(self._by_rank(self.waiting, now))
        self._admit_waiting(budget, chunks, finished)
        return SchedulerOutput(tuple(chunks), tuple(preempted), tuple(finished))

    def _admit_waiting(
        self, budget: int, chunks: list[ScheduledChunk], finished: list[Sequence]
    ) -> None:
        """Admit waiting sequences in rank order while the policy lets them in.

        Predicted admission also backfills: when the first waiting sequence does not fit,
        the ones behind it that are predicted to finish before it could start (as the
        running ones finish) and fit now run in the meantime, so a big request at the head
        of the line does not leave the pool idle, and is not delayed by them either.
        """
        if not self.waiting:
            return  # the projection below costs O(running pages): not built for nothing
        projection = RunningProjection(self.allocator, self.running) if self._predicted else None
        backfill_until: int | None = None  # steps until the blocked head is predicted to fit
        index = 0
        while (
            index < min(len(self.waiting), self.BACKFILL_WINDOW)
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[index]
            predicted = self._predict(seq)
            if backfill_until is not None and (
                predicted is None or predicted - seq.num_tokens > backfill_until
            ):
                index += 1  # would not finish before the head can start: not looked at further
                continue
            cached = self._cached_prefix(seq)
            start = len(cached) * self.allocator.block_size
            num_new = min(seq.num_tokens - start, budget)
            need = self.allocator.blocks_for(start + num_new) - len(cached)
            revived = self.allocator.num_unreferenced(cached)  # cached pages leaving the free pool
            free = self.allocator.num_free_blocks - revived
            if projection is None:
                fits = need + self._watermark_blocks <= free
            else:
                # Its pages beside the running ones' projected peak; with no prediction for
                # it yet, its pages now (fcfs) with the watermark to spare.
                shared = len(cached) - revived  # already held by running sequences
                span = Span(seq.num_tokens, (predicted or seq.num_tokens) - seq.num_tokens, shared)
                margin = 0 if predicted is not None else self._watermark_blocks
                capacity = self.allocator.num_blocks - margin
                fits = projection.peak_with(span) <= capacity
                if backfill_until is None and not fits and self.running:
                    backfill_until = projection.steps_until_fits(span, capacity)
                    index += 1
                    continue
            if need > free or (not fits and self.running):
                if backfill_until is not None:
                    index += 1
                    continue
                if not self.running and not chunks:
                    del self.waiting[index]
                    self.finish(seq, "length")
                    finished.append(seq)
                    continue
                break
            del self.waiting[index]
            self._admit(seq, cached)
            seq.predicted_num_tokens = predicted
            grown = self._grow(seq, num_new)
            assert grown, "the pages were counted above"
            chunks.append(ScheduledChunk(seq, num_new))
            budget -= num_new
            if projection is not None:
                projection.add(seq)

    def _predict(self, seq: Sequence) -> int | None:
        """Prompt + predicted output tokens of `seq` (at least one more than it has), or None
        under fcfs or while the predictor has seen too few requests like it."""
        if not self._predicted:
            return None
        num_output = self.predictor.predict(seq.num_prompt_tokens, seq.params, seq.length_hint)
        if num_output is None:
            return None
        return max(seq.num_prompt_tokens + num_output, seq.num_tokens + 1)

    def _by_rank(self, seqs: Iterable[Sequence], now: float) -> list[Sequence]:
        """`seqs` by effective priority (highest first), then arrival (oldest first).

        NOTE: among equal base priorities aging never reorders (older means at least as
        aged), so the common all-equal case is one sort by arrival time.
        """
        by_arrival = sorted(seqs, key=attrgetter("arrival_time"))
        if len({seq.priority for seq in by_arrival}) <= 1:
            return by_arrival
        aging_s = self.config.priority_aging_s
        # Stable sort: arrival order is kept among equal effective priorities.
        return sorted(
            by_arrival, key=lambda seq: -(seq.priority + int((now - seq.arrival_time) // aging_s))
        )

    def _grow(self, seq: Sequence, num_new: int) -> bool:
        """Ensure `seq` has pages for its next `num_new` tokens; False if the pool is short."""
        need = self.allocator.blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_ids)
        if need <= 0:
            return True
        if not self.allocator.can_allocate(need):
            return False
        seq.block_ids.extend(self.allocator.allocate(need))
        return True

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached pages matching `seq`'s first full pages (no side effects). The last token is
        never covered: it must run to give the logits of the next one (a prompt cached whole
        recomputes its last page into a fresh one; cached pages are never written)."""
        if not self.allocator.enable_caching:
            return []
        num_blocks = (seq.num_tokens - 1) // self.allocator.block_size
        return self.allocator.match(seq.block_keys(self.allocator.block_size, num_blocks))

    def _admit(self, seq: Sequence, cached: list[int]) -> None:
        """Start `seq` running on its `cached` pages, counted as computed."""
        self.allocator.share(cached)
        seq.block_ids = list(cached)
        seq.num_cached_blocks = len(cached)
        seq.num_computed_tokens = len(cached) * self.allocator.block_size
        if seq.num_preemptions:
            self.num_recomputed_tokens += seq.num_tokens - seq.num_computed_tokens
        self.num_prefix_query_tokens += seq.num_tokens
        self.num_prefix_hit_tokens += seq.num_computed_tokens
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _cache_pages(self, seq: Sequence) -> None:
        """Offer `seq`'s pages that are full and computed, and not offered yet, to the cache."""
        num_full = seq.num_computed_tokens // self.allocator.block_size
        if num_full <= seq.num_cached_blocks or not self.allocator.enable_caching:
            return
        keys = seq.block_keys(self.allocator.block_size, num_full)
        for i in range(seq.num_cached_blocks, num_full):
            self.allocator.cache(seq.block_ids[i], keys[i])
        seq.num_cached_blocks = num_full

    def _preempt(self, seq: Sequence) -> None:
        """Drop `seq`'s KV (recompute later, less what stays cached) and put it back in line
        (at its rank: ahead of newer requests of its effective priority)."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def _release(self, seq: Sequence, cache: bool = True) -> None:
        if cache:
            self._cache_pages(seq)
        if seq.block_ids:
            self.allocator.free(seq.block_ids)
            seq.block_ids = []
        seq.num_cached_blocks = 0
