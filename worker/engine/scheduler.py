"""Scheduler: decides which tokens of which sequences go into the next forward pass.

There is no prefill phase and no decode phase (as in vLLM v1): every sequence
has `num_computed_tokens` and `num_tokens`, and each step hands out tokens
under one budget — running sequences first (a decode is one token, an
unfinished prefill gets a chunk), then waiting ones in arrival order. When the
KV pool runs dry the newest running sequence is preempted and later recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from worker.config import SchedulerConfig
from worker.engine.block_allocator import BlockAllocator
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

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._watermark_blocks = int(self.WATERMARK * allocator.num_blocks)
        self.num_preemptions = 0

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
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        finished: list[Sequence] = []

        # Running sequences first, oldest first; preempt from the newest end.
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

        # Then waiting sequences in arrival order, while they fit.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self.allocator.blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_ids)
            if need + self._watermark_blocks > self.allocator.num_free_blocks and self.running:
                break
            if not self._grow(seq, num_new):
                if not self.running and not chunks:
                    self.waiting.popleft()
                    self.finish(seq, "length")
                    finished.append(seq)
                    continue
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, num_new))
            budget -= num_new

        return SchedulerOutput(tuple(chunks), tuple(preempted), tuple(finished))

    def _grow(self, seq: Sequence, num_new: int) -> bool:
        """Ensure `seq` has pages for its next `num_new` tokens; False if the pool is short."""
        need = self.allocator.blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_ids)
        if need <= 0:
            return True
        if not self.allocator.can_allocate(need):
            return False
        seq.block_ids.extend(self.allocator.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Drop `seq`'s KV (recompute later) and put it first in line to resume."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.block_ids:
            self.allocator.free(seq.block_ids)
            seq.block_ids = []
