"""Jobs stage: the in-flight table, the one owner of which jobs (and refused entries) a worker holds.

A job is held from the moment its entry is admitted (so a cancel finds it at once)
until its final result and XACK are written; an entry being refused (undecodable, or
out of attempts) is held until its error result is written, so its claim is kept
fresh and a reclaim of it is ignored. `JobState` is one held job's bookkeeping.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from worker.engine import OutputAccumulator, Request
from worker.keys import EntryRef
from worker.protocol import Job


def now_ms() -> float:
    return time.time() * 1000.0


def entry_time_ms(entry_id: str) -> int:
    """Unix ms at which Redis appended the entry (the first half of its id)."""
    return int(entry_id.split("-", 1)[0])


@dataclass(eq=False)
class JobState:
    """One job this worker holds, from XREADGROUP until its final result is acked.

    Its fields change only through the transitions below, so that what a job can go
    through is read here, in one place: intake `start`s it, the publisher notes its first
    token and folds engine outputs into `output` (the accumulator owns its own contents),
    and whoever queues its final result (or leaves it to other workers) `mark_done`s it.
    """

    entry_id: str
    job: Job
    attempt: int
    stream: str  # the request stream holding the entry (one per priority level)
    request: Request | None = None  # set once it is handed to the engine
    output: OutputAccumulator | None = None  # token outputs folded so far (set with request)
    started_ms: float | None = None
    first_token_ms: float | None = None
    cancel_requested: bool = False
    # Other entries of this job id, acked while it ran: deleted with its final result.
    duplicates: list[EntryRef] = field(default_factory=list)
    done: bool = False  # final result queued: later engine outputs are ignored

    @property
    def ref(self) -> EntryRef:
        return (self.stream, self.entry_id)

    @property
    def running(self) -> bool:
        return self.started_ms is not None and not self.done

    def start(self, request: Request, output: OutputAccumulator) -> None:
        """Handed to the engine as `request`; its outputs fold into `output`."""
        self.request = request
        self.output = output
        self.started_ms = now_ms()

    def note_first_token(self) -> float | None:
        """Record the first generated token's time (unix ms); returned the first time only."""
        if self.first_token_ms is not None:
            return None
        self.first_token_ms = now_ms()
        return self.first_token_ms

    def request_cancel(self) -> None:
        self.cancel_requested = True

    def mark_done(self) -> None:
        """Final result queued (or the job left to other workers): later outputs are ignored."""
        self.done = True


class JobTable:
    """The jobs one worker holds (by job id) and the entries it is refusing.

    limit: how many may be held at once (jobs and refusals together): `room` is what is left.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight: dict[str, JobState] = {}
        self._refusing: set[EntryRef] = set()
        self.peak = 0

    def __len__(self) -> int:
        return len(self.inflight)

    def __iter__(self) -> Iterator[JobState]:
        return iter(list(self.inflight.values()))

    @property
    def room(self) -> int:
        return self.limit - len(self.inflight) - len(self._refusing)

    @property
    def empty(self) -> bool:
        """Nothing held: no job in flight and no refusal being written."""
        return not (self.inflight or self._refusing)

    def get(self, job_id: str) -> JobState | None:
        return self.inflight.get(job_id)

    def live(self, job_id: str) -> JobState | None:
        """The held job `job_id` unless its final result is queued already."""
        state = self.inflight.get(job_id)
        return None if state is None or state.done else state

    def add(self, state: JobState) -> None:
        self.inflight[state.job.id] = state
        self._note_peak()

    def release(self, state: JobState) -> None:
        """Forget `state` (its final result is acked, or it is left to other workers)."""
        if self.inflight.get(state.job.id) is state:
            del self.inflight[state.job.id]

    def job_ids(self) -> list[str]:
        return list(self.inflight)

    # -- refusals ---------------------------------------------------------------------

    def refusing(self, entry: EntryRef) -> bool:
        return entry in self._refusing

    def start_refusal(self, entry: EntryRef) -> None:
        self._refusing.add(entry)
        self._note_peak()

    def end_refusal(self, entry: EntryRef) -> None:
        self._refusing.discard(entry)

    def held_entries(self) -> list[EntryRef]:
        """Entries this worker answers for now: in flight, or being refused."""
        return [s.ref for s in self.inflight.values()] + list(self._refusing)

    def _note_peak(self) -> None:
        self.peak = max(self.peak, len(self.inflight) + len(self._refusing))
