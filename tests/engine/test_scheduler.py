"""Scheduler: token budget, chunked prefill, admission and preemption, without a model."""

from dataclasses import replace

from worker.config import SchedulerConfig
from worker.engine.block_allocator import BlockAllocator
from worker.engine.kv_projection import Span, peak_pages
from worker.engine.length_predictor import LengthPredictor, PredictorConfig
from worker.engine.scheduler import Scheduler
from worker.engine.sequence import Request, Sequence, SequenceStatus
from worker.params import SamplingParams


def _seq(name: str, num_prompt: int) -> Sequence:
    return Sequence(Request(name, tuple(range(1, num_prompt + 1))))


def run_plan(plan) -> None:
    """Apply a plan as the engine would: tokens computed, one token sampled where due."""
    for chunk in plan.chunks:
        samples = chunk.samples  # read before the update: it depends on the computed count
        chunk.seq.num_computed_tokens += chunk.num_new_tokens
        if samples:
            chunk.seq.output_token_ids.append(7)


def test_prefill_is_chunked_under_the_token_budget() -> None:
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4), BlockAllocator(16, 4)
    )
    seq = _seq("a", 20)
    sched.add(seq)
    sizes = []
    while seq.num_output_tokens == 0:
        plan = sched.schedule()
        sizes.append([c.num_new_tokens for c in plan.chunks])
        run_plan(plan)
    assert sizes == [[8], [8], [4]]


def test_decodes_and_prefill_chunks_share_one_step() -> None:
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=6, max_num_seqs=4), BlockAllocator(32, 4)
    )
    a, b = _seq("a", 3), _seq("b", 10)
    sched.add(a)
    run_plan(sched.schedule())  # a's prefill, a samples
    sched.add(b)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.num_new_tokens) for c in plan.chunks] == [("a", 1), ("b", 5)]
    assert plan.num_batched_tokens == 6


def test_max_num_seqs_limits_admission() -> None:
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=2), BlockAllocator(32, 4)
    )
    for name in "abc":
        sched.add(_seq(name, 2))
    plan = sched.schedule()
    assert [c.seq.request_id for c in plan.chunks] == ["a", "b"]
    assert len(sched.waiting) == 1


def test_newest_sequence_is_preempted_and_resumes_with_recompute() -> None:
    alloc = BlockAllocator(4, 4)  # 16 tokens in all
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), alloc)
    a, b = _seq("a", 7), _seq("b", 7)
    sched.add(a)
    sched.add(b)
    preempted = []
    for _ in range(6):
        plan = sched.schedule()
        preempted += plan.preempted
        run_plan(plan)
    assert b in preempted and a not in preempted
    assert b.num_preemptions >= 1
    # Every page is accounted for: held by running sequences (shared ones once) or free.
    held = len({b for s in sched.running for b in s.block_ids})
    assert held + alloc.num_free_blocks == alloc.num_blocks


def test_sequence_larger_than_the_pool_finishes_with_length() -> None:
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), BlockAllocator(2, 4)
    )
    seq = _seq("a", 7)
    sched.add(seq)
    finished = []
    for _ in range(4):
        plan = sched.schedule()
        finished += plan.finished
        run_plan(plan)
    assert finished == [seq]
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "length"
    assert sched.allocator.num_free_blocks == 2


def test_finish_frees_pages_at_once() -> None:
    alloc = BlockAllocator(8, 4)
    sched = Scheduler(SchedulerConfig(), alloc)
    seq = _seq("a", 9)
    sched.add(seq)
    run_plan(sched.schedule())
    assert alloc.num_free_blocks == 5
    sched.finish(seq, "abort")
    assert alloc.num_free_blocks == 8 and not sched.has_unfinished()


# -- predicted-length admission ------------------------------------------------------


def _drive(sched: Scheduler, max_steps: int = 200) -> list[str]:
    """Run to completion as the engine would, feeding the predictor; returns the
    request ids of every preemption, in order."""
    preempted = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return preempted
        plan = sched.schedule()
        preempted += [s.request_id for s in plan.preempted]
        run_plan(plan)
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.num_output_tokens >= seq.params.max_tokens and not seq.is_finished:
                sched.predictor.observe(seq.num_prompt_tokens, seq.params, seq.num_output_tokens)
                sched.finish(seq, "length")
    raise AssertionError("did not finish")


def _long(name: str, max_tokens: int = 20, hint: int | None = None) -> Sequence:
    request = Request(name, tuple(range(1, 8)), SamplingParams(max_tokens=max_tokens))
    return Sequence(replace(request, length_hint=hint))


def _sched(admission: str, num_blocks: int = 12) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, admission=admission)
    predictor = LengthPredictor(PredictorConfig(min_samples=2))
    return Scheduler(config, BlockAllocator(num_blocks, 4, enable_caching=False), predictor)


def _teach(sched: Scheduler, num_output: int, max_tokens: int = 20) -> None:
    for _ in range(2):
        sched.predictor.observe(7, SamplingParams(max_tokens=max_tokens), num_output)


def test_predicted_admission_waits_for_room_instead_of_preempting() -> None:
    # 12 pages of 4 tokens; each request grows to 7 + 20 = 27 tokens (7 pages).
    fcfs, predicted = _sched("fcfs"), _sched("predicted")
    _teach(predicted, 20)
    for sched in (fcfs, predicted):
        sched.add(_long("a"))
        sched.add(_long("b"))
    first = predicted.schedule()
    assert [c.seq.request_id for c in first.chunks] == ["a"]  # b's 7 pages do not fit beside a's
    assert predicted.running[0].predicted_num_tokens == 27
    run_plan(first)
    assert _drive(predicted) == [] and predicted.num_recomputed_tokens == 0
    assert _drive(fcfs) == ["b"]  # both admitted at once: b is preempted, then recomputed
    assert fcfs.num_preemptions == 1 and fcfs.num_recomputed_tokens > 7


def test_a_sequence_that_outgrows_its_prediction_is_preempted_as_a_safety_net() -> None:
    sched = _sched("predicted")
    _teach(sched, 2)  # predicts 2 output tokens: both fit, but they grow to 20
    sched.add(_long("a"))
    sched.add(_long("b"))
    assert len(sched.schedule().chunks) == 2
    assert _drive(sched) == ["b"]
    assert sched.allocator.num_free_blocks == 12


def test_without_enough_samples_predicted_admission_is_fcfs() -> None:
    fcfs, predicted = _sched("fcfs"), _sched("predicted")
    for sched in (fcfs, predicted):
        sched.add(_long("a"))
        sched.add(_long("b"))
    assert _drive(fcfs) == _drive(predicted) == ["b"]


def test_length_hint_overrides_what_was_seen() -> None:
    sched = _sched("predicted")
    _teach(sched, 2)
    sched.add(_long("a", hint=20))
    sched.add(_long("b", hint=20))
    plan = sched.schedule()
    assert [c.seq.request_id for c in plan.chunks] == ["a"]
    run_plan(plan)
    # A sequence past its prediction still counts the page of its next token: a (8 tokens,
    # 2 pages) is projected to need a third, so b's 7 pages fit only in a pool of 10.
    a = sched.running[0]
    a.predicted_num_tokens = 1
    assert a.num_tokens == 8 and len(a.block_ids) == 2
    b = sched.waiting[0]
    b.predicted_num_tokens = 27
    assert peak_pages([Span(8, 1), Span(7, 20)], 4) == 7  # b alone at its end: 27 tokens
    assert peak_pages([Span(8, 1), Span(7, 1)], 4) == 5  # both alive one token from now


def test_predicted_admission_counts_pages_freed_by_sequences_that_finish_first() -> None:
    # 12 pages of 4 tokens. a (7 + 2 tokens) finishes long before b (7 + 33 = 40 tokens,
    # 10 pages) needs its last pages: at most 10 pages are ever in use, so b is admitted at
    # once, although a's and b's final sizes (3 + 10 pages) do not fit side by side.
    sched = _sched("predicted")
    sched.add(_long("a", max_tokens=2, hint=2))
    sched.add(_long("b", max_tokens=33, hint=33))
    first = sched.schedule()
    assert [c.seq.request_id for c in first.chunks] == ["a", "b"]
    run_plan(first)
    assert _drive(sched) == [] and sched.num_preemptions == 0


def test_predicted_admission_backfills_behind_a_head_that_does_not_fit_yet() -> None:
    # 12 pages of 4 tokens. a runs to 7 + 25 = 32 tokens (8 pages); b, first in line, needs
    # as much and fits only once a finishes (25 steps). c (7 + 2 tokens) fits now and is
    # predicted to finish long before that, so it runs meanwhile; d (7 + 30) would not finish
    # in time and waits behind b.
    sched = _sched("predicted")
    for name, hint in (("a", 25), ("b", 25), ("c", 2), ("d", 30)):
        sched.add(_long(name, max_tokens=hint, hint=hint))
    first = sched.schedule()
    assert [c.seq.request_id for c in first.chunks] == ["a", "c"]
    assert [s.request_id for s in sched.waiting] == ["b", "d"]
    run_plan(first)
    assert _drive(sched) == [] and sched.num_preemptions == 0


class FakeClock:
    """A settable clock for the scheduler's aging (seconds, like time.monotonic)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _prio_seq(name: str, num_prompt: int, priority: int, arrival: float) -> Sequence:
    tokens = tuple(range(1, num_prompt + 1))
    return Sequence(Request(name, tokens, arrival_time=arrival, priority=priority))


def _preempted_over(sched: Scheduler, steps: int) -> list[Sequence]:
    """Run `steps` steps as the engine would; every sequence they preempted, in order."""
    preempted: list[Sequence] = []
    for _ in range(steps):
        plan = sched.schedule()
        preempted += plan.preempted
        run_plan(plan)
    return preempted


def test_waiting_sequences_are_admitted_by_priority_then_arrival() -> None:
    clock = FakeClock()
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=3),
        BlockAllocator(32, 4),
        clock=clock,
    )
    for name, prio, arrival in [("low", -1, 1.0), ("a0", 0, 2.0), ("hi", 5, 9.0), ("b0", 0, 3.0)]:
        sched.add(_prio_seq(name, 2, prio, clock.now - 10 + arrival))
    plan = sched.schedule()
    assert [c.seq.request_id for c in plan.chunks] == ["hi", "a0", "b0"]
    assert [s.request_id for s in sched.waiting] == ["low"]


def test_preemption_victim_is_the_lowest_priority_then_newest_running_sequence() -> None:
    clock = FakeClock()
    alloc = BlockAllocator(6, 4)  # 24 tokens in all
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4), alloc, clock=clock
    )
    # "old_low" arrived first but has the lowest priority; "new_hi" is newest but highest.
    seqs = {
        "old_low": _prio_seq("old_low", 7, 0, clock.now - 3),
        "mid": _prio_seq("mid", 7, 1, clock.now - 2),
        "new_hi": _prio_seq("new_hi", 7, 2, clock.now - 1),
    }
    for seq in seqs.values():
        sched.add(seq)
    preempted = _preempted_over(sched, 4)
    assert preempted and preempted[0] is seqs["old_low"]
    assert seqs["new_hi"].num_preemptions == 0


def test_preemption_among_equal_priorities_takes_the_newest() -> None:
    clock = FakeClock()
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4),
        BlockAllocator(4, 4),
        clock=clock,
    )
    old, new = _prio_seq("old", 7, 1, clock.now - 2), _prio_seq("new", 7, 1, clock.now - 1)
    sched.add(new)  # added first, but arrived later: rank follows arrival, not add order
    sched.add(old)
    preempted = _preempted_over(sched, 6)
    assert preempted and all(s is new for s in preempted)


def test_aging_admits_a_low_priority_request_while_high_priority_ones_keep_arriving() -> None:
    """The rule: effective priority = priority + floor(wait / priority_aging_s). A request of
    priority p waiting behind a stream of fresh priority-q requests (q > p) is admitted once it
    has waited (q - p) * aging_s: then it ties with them and its earlier arrival wins."""
    clock = FakeClock()
    aging_s = 10.0
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=1, priority_aging_s=aging_s),
        BlockAllocator(64, 4),
        clock=clock,
    )
    low = _prio_seq("low", 2, -1, clock.now)
    sched.add(low)
    admitted_at = None
    for step in range(100):
        # A fresh priority-1 request arrives every second; the one running finishes each step.
        sched.add(_prio_seq(f"hi{step}", 2, 1, clock.now))
        plan = sched.schedule()
        [chunk] = plan.chunks
        if chunk.seq is low:
            admitted_at = clock.now - low.arrival_time
            break
        sched.finish(chunk.seq, "stop")
        clock.now += 1.0
    assert admitted_at is not None, "the low-priority request starved"
    assert admitted_at == 2 * aging_s  # two levels below: two aging periods
