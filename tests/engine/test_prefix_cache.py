"""Prefix caching: the allocator's cached pages, the scheduler's hits, and token-identical
engine outputs with caching on and off (float32, int8 KV, preemption)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.engine.test_scheduler import run_plan
from worker.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from worker.engine.block_allocator import BlockAllocator, block_key
from worker.engine.engine import Engine
from worker.engine.scheduler import Scheduler
from worker.engine.sequence import Request, Sequence
from worker.params import SamplingParams

# -- BlockAllocator ------------------------------------------------------------------


def _keys(*pages: tuple[int, ...]) -> list:
    keys: list = []
    for tokens in pages:
        keys.append(block_key(keys[-1] if keys else None, tokens))
    return keys


def test_a_freed_cached_page_stays_findable_and_is_revived_by_share() -> None:
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    ids = alloc.allocate(2)
    keys = _keys((1, 2), (3, 4))
    for block_id, key in zip(ids, keys, strict=True):
        alloc.cache(block_id, key)
    alloc.free(ids)
    assert alloc.num_free_blocks == 4 and alloc.num_cached_blocks == 2
    assert alloc.match(keys) == ids
    assert alloc.num_unreferenced(ids) == 2
    alloc.share(ids)  # a new user takes them out of the free pool
    assert alloc.num_free_blocks == 2 and alloc.num_unreferenced(ids) == 0
    alloc.share(ids[:1])  # and a second user of the first page
    alloc.free(ids)
    alloc.free(ids[:1])
    assert alloc.num_free_blocks == 4
    with pytest.raises(RuntimeError):
        alloc.free(ids[:1])


def test_eviction_takes_never_cached_pages_first_then_least_recently_freed() -> None:
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    a, b, c, plain = alloc.allocate(4)
    ka, kb, kc = (block_key(None, (i, i)) for i in range(3))
    alloc.cache(a, ka)
    alloc.cache(b, kb)
    alloc.cache(c, kc)
    for block_id in (b, a, c, plain):  # freed in this order: b is the least recent
        alloc.free([block_id])
    assert alloc.allocate(1) == [plain]
    assert alloc.allocate(1) == [b]
    assert alloc.match([kb]) == [] and alloc.match([ka]) == [a]
    assert alloc.allocate(1) == [a]
    assert alloc.num_cached_blocks == 1


def test_referenced_pages_are_never_evicted() -> None:
    alloc = BlockAllocator(num_blocks=2, block_size=2)
    held, freed = alloc.allocate(2)
    k_held, k_freed = block_key(None, (1, 1)), block_key(None, (2, 2))
    alloc.cache(held, k_held)
    alloc.cache(freed, k_freed)
    alloc.free([freed])
    assert not alloc.can_allocate(2)
    assert alloc.allocate(1) == [freed]
    assert alloc.match([k_held]) == [held] and alloc.match([k_freed]) == []
    with pytest.raises(RuntimeError):
        alloc.allocate(1)


def test_keys_chain_through_every_earlier_page() -> None:
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    first = _keys((1, 2), (3, 4))
    ids = alloc.allocate(2)
    alloc.cache(ids[0], first[0])
    alloc.cache(ids[1], first[1])
    # The same second page after another first page is another key.
    other = _keys((9, 9), (3, 4))
    assert other[1] != first[1] and alloc.match(other) == []
    # A chain stops at its first miss, even if a later key is cached.
    diverging = _keys((1, 2), (5, 6))
    assert alloc.match(diverging) == ids[:1]
    assert alloc.match([first[0], diverging[1], first[1]]) == ids[:1]


def test_a_key_cached_twice_keeps_its_first_page() -> None:
    alloc = BlockAllocator(num_blocks=2, block_size=2)
    a, b = alloc.allocate(2)
    key = block_key(None, (1, 2))
    alloc.cache(a, key)
    alloc.cache(b, key)  # computed again by a concurrent sequence: stays private
    alloc.free([a, b])
    assert alloc.match([key]) == [a] and alloc.num_cached_blocks == 1


def test_caching_off_finds_nothing() -> None:
    alloc = BlockAllocator(num_blocks=2, block_size=2, enable_caching=False)
    ids = alloc.allocate(1)
    key = block_key(None, (1, 2))
    alloc.cache(ids[0], key)
    assert alloc.match([key]) == [] and alloc.num_cached_blocks == 0


def test_sequence_block_keys_are_shared_by_equal_prefixes_only() -> None:
    a = Sequence(Request("a", (1, 2, 3, 4, 5, 6, 7)))
    b = Sequence(Request("b", (1, 2, 3, 4, 5, 0, 7)))
    assert a.block_keys(2, 2) == b.block_keys(2, 2)
    assert a.block_keys(2, 3)[2] != b.block_keys(2, 3)[2]
    with pytest.raises(ValueError):
        a.block_keys(2, 4)  # the fourth page holds one token: not full


# -- Scheduler -----------------------------------------------------------------------


def _seq(name: str, tokens: list[int]) -> Sequence:
    return Sequence(Request(name, tuple(tokens)))


def _scheduler(num_blocks: int, block_size: int = 4, budget: int = 64) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8)
    return Scheduler(config, BlockAllocator(num_blocks, block_size))


def test_a_later_request_starts_after_the_cached_full_pages() -> None:
    sched = _scheduler(16)
    a = _seq("a", list(range(1, 11)))  # 2 full pages + 2 tokens
    sched.add(a)
    run_plan(sched.schedule())
    b = _seq("b", list(range(1, 10)) + [99, 98])  # same first 9 tokens: 2 full pages match
    sched.add(b)
    plan = sched.schedule()
    chunk = next(c for c in plan.chunks if c.seq is b)
    assert (b.num_computed_tokens, chunk.num_new_tokens) == (8, 3)
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert (sched.num_prefix_query_tokens, sched.num_prefix_hit_tokens) == (10 + 11, 8)


def test_a_prompt_cached_whole_recomputes_its_last_page() -> None:
    sched = _scheduler(16)
    a = _seq("a", list(range(1, 9)))  # exactly 2 pages
    sched.add(a)
    run_plan(sched.schedule())
    sched.finish(a, "stop")
    b = _seq("b", list(range(1, 9)))
    sched.add(b)
    plan = sched.schedule()
    # Page 1 holds the last token, whose logits are needed: recomputed into a fresh page.
    assert (b.num_computed_tokens, plan.chunks[0].num_new_tokens) == (4, 4)
    run_plan(plan)
    c = _seq("c", list(range(1, 10)))  # one token past the 2 pages: both pages match
    sched.add(c)
    plan = sched.schedule()
    assert c.num_computed_tokens == 8
    assert [(x.seq.request_id, x.num_new_tokens) for x in plan.chunks] == [("b", 1), ("c", 1)]


def test_a_preempted_sequence_refinds_its_cached_pages() -> None:
    sched = _scheduler(5)  # 20 tokens
    a = _seq("a", list(range(1, 9)))  # 2 pages
    b = _seq("b", list(range(101, 110)))  # 3 pages: 2 full + 1 token
    sched.add(a)
    sched.add(b)
    run_plan(sched.schedule())
    b_pages = list(b.block_ids[:2])
    plan = sched.schedule()  # a needs a third page: b, the newest, is preempted
    assert plan.preempted == (b,)
    run_plan(plan)
    assert b not in sched.running and sched.allocator.match(b.block_keys(4, 2)) == b_pages
    sched.finish(a, "stop")
    plan = sched.schedule()
    assert b.block_ids[:2] == b_pages and b.num_computed_tokens == 8
    assert [(c.seq, c.num_new_tokens) for c in plan.chunks] == [(b, 2)]  # token 9 + its output


def test_every_page_returns_to_the_pool_with_caching() -> None:
    sched = _scheduler(6, budget=6)  # small budget: requests overlap, chunked
    seqs = [_seq(str(i), [1, 2, 3, 4, 5, 6, 7, 8] + [50 + i] * (1 + i)) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(200):
        if not sched.has_unfinished():
            break
        plan = sched.schedule()
        run_plan(plan)
        for c in plan.chunks:
            if c.seq.num_output_tokens >= 3 and not c.seq.is_finished:
                sched.finish(c.seq, "length")
    assert not sched.has_unfinished()
    assert sched.allocator.num_free_blocks == 6
    assert sched.num_prefix_hit_tokens > 0


# -- Engine --------------------------------------------------------------------------


def _engine(model_dir: Path, prefix_caching: bool, kv: str = "auto", **kw: int) -> Engine:
    cache = {k: kw.pop(k) for k in ("num_blocks",) if k in kw}
    return Engine(
        EngineConfig(
            model=ModelConfig(source=str(model_dir), dtype="float32"),
            cache=CacheConfig(
                memory_gib=0.05, dtype=kv, enable_prefix_caching=prefix_caching, **cache
            ),
            scheduler=SchedulerConfig(**kw),
        )
    )


def _greedy(engine: Engine, prompts: list[list[int]], max_new: int = 12) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    requests = [Request(str(i), tuple(p), params) for i, p in enumerate(prompts)]
    return [list(c.token_ids) for c in engine.generate(requests)]


def _shared_prefix_prompts(seed: int = 0) -> list[list[int]]:
    """Prefixes of 5 (under a page), 16 (a page), 23 and 40 (mid-page) and 64 (4 pages)
    tokens, each with suffixes of 1, 7 and 20 tokens, alone (a prompt equal to the prefix),
    and one prompt twice."""
    rng = random.Random(seed)
    prompts = []
    for length in (5, 16, 23, 40, 64):
        prefix = [rng.randrange(100, 20000) for _ in range(length)]
        prompts.append(prefix)
        for n in (1, 7, 20):
            prompts.append(prefix + [rng.randrange(100, 20000) for _ in range(n)])
        prompts.append(list(prompts[-1]))
    return prompts


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_outputs_identical_with_caching_on_and_off(arch: str, tiny_model_dir) -> None:
    model_dir = tiny_model_dir(arch)
    prompts = _shared_prefix_prompts()
    # A small token budget staggers admission, so later requests find earlier ones' pages.
    on, off = (_engine(model_dir, flag, max_num_batched_tokens=48) for flag in (True, False))
    got, expected = _greedy(on, prompts), _greedy(off, prompts)
    assert got == expected
    first_hits = on.stats().prefix_cache_hits
    assert first_hits > 0 and off.stats().prefix_cache_hits == 0
    # Much later, on the same engine: every prompt finds its full pages again.
    assert _greedy(on, prompts) == expected
    stats = on.stats()
    assert stats.prefix_cache_hits - first_hits == sum((len(p) - 1) // 16 * 16 for p in prompts)
    assert 0 < stats.prefix_cache_hit_ratio < 1
    assert stats.num_free_blocks == stats.num_total_blocks  # cached pages are free pages


def test_preemption_with_caching_gives_the_same_tokens(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama")
    prompts = _shared_prefix_prompts(seed=1)[15:]  # prefixes of 40 and 64 tokens
    expected = _greedy(_engine(model_dir, False), prompts, max_new=24)
    small = _engine(model_dir, True, num_blocks=14)  # 224 tokens for 10 sequences of 64-108
    assert _greedy(small, prompts, max_new=24) == expected
    stats = small.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.num_free_blocks == stats.num_total_blocks


def test_int8_kv_pages_are_shared_with_the_same_tokens(tiny_model_dir) -> None:
    """With int8 K/V a chunk attends to its own tokens unquantized and to earlier chunks'
    quantized: both engines split at the cached prefix (a budget of 32 tokens, a prefix of
    two pages) so they do the same arithmetic, one request at a time."""
    model_dir = tiny_model_dir("llama")
    rng = random.Random(2)
    prefix = [rng.randrange(100, 20000) for _ in range(32)]
    prompts = [prefix + [rng.randrange(100, 20000) for _ in range(n)] for n in (3, 17, 30)]
    on, off = (
        _engine(model_dir, flag, kv="int8", max_num_batched_tokens=32) for flag in (True, False)
    )
    got = [_greedy(on, [p])[0] for p in prompts]
    assert got == [_greedy(off, [p])[0] for p in prompts]
    assert on.stats().prefix_cache_hits == 2 * 32  # the 2nd and 3rd prompts' prefix


# -- Flags and reports ---------------------------------------------------------------


def test_on_by_default_and_a_flag_turns_it_off_on_every_verb() -> None:
    import argparse

    from worker.cli.bulk import local_worker_flags
    from worker.cli.bulk import register as register_bulk
    from worker.cli.options import (
        add_arguments,
        add_engine_args,
        engine_config_from_args,
        worker_config_from_args,
        worker_config_from_env,
    )

    assert worker_config_from_env({}).engine.cache.enable_prefix_caching
    off = worker_config_from_env({"HEADRACE_PREFIX_CACHING": "0"})
    assert not off.engine.cache.enable_prefix_caching
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--no-prefix-caching"])
    assert not worker_config_from_args(args, {}).engine.cache.enable_prefix_caching

    generate = argparse.ArgumentParser()
    add_engine_args(generate)  # generate and bench
    assert engine_config_from_args(generate.parse_args([])).cache.enable_prefix_caching
    args = generate.parse_args(["--no-prefix-caching"])
    assert not engine_config_from_args(args).cache.enable_prefix_caching

    bulk = argparse.ArgumentParser().add_subparsers()
    register_bulk(bulk)
    parse = bulk.choices["bulk"].parse_args
    assert local_worker_flags(parse(["in.jsonl", "-o", "out.jsonl"])) == ()
    args = parse(["in.jsonl", "-o", "o", "--no-prefix-caching", "--block-size", "8"])
    flags = local_worker_flags(args)
    assert "--no-prefix-caching" in flags
    # The local worker parses them back.
    assert not worker_config_from_args(
        parser.parse_args(flags), {}
    ).engine.cache.enable_prefix_caching


def test_metrics_and_stats_report_the_hit_ratio() -> None:
    from worker.cli.stats import ConsumerStats, QueueStats, render
    from worker.engine.engine import EngineStats
    from worker.service.metrics import Metrics

    metrics = Metrics()
    base = dict(num_running=0, num_waiting=0, num_free_blocks=8, num_total_blocks=8)
    base.update(block_size=16, num_preemptions=0, num_batched_tokens=0)
    metrics.observe_step(EngineStats(**base, prefix_cache_queries=100, prefix_cache_hits=60))
    metrics.observe_step(EngineStats(**base, prefix_cache_queries=200, prefix_cache_hits=150))
    value = metrics.registry.get_sample_value
    assert value("headrace_prefix_cache_hit_ratio") == 0.75
    assert value("headrace_prefix_cache_query_tokens_total") == 200
    assert value("headrace_prefix_cache_hit_tokens_total") == 150
    report = metrics.snapshot()
    assert report["prefix_cache_hit_ratio"] == 0.75

    worker = ConsumerStats("w1", 0, 1.0, True, report)
    stats = QueueStats("ns", "ns:requests", 0, 0, 0, None, None, 0, (worker,), 1, 0.0, 0.0, 0.75)
    text = render(stats, "redis://localhost:6379/0")
    assert "prefix cache 75% of prompt tokens" in text
    assert "cache hit" in text and " 75% " in text.splitlines()[-1]
