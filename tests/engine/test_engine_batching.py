"""Continuous batching never changes results: alone = together = chunked = preempted."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.prompts_data import PROMPTS
from worker.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from worker.engine.engine import Engine
from worker.engine.sequence import Request
from worker.params import SamplingParams

MAX_NEW = 24


def _engine(model_dir: Path, cache: CacheConfig | None = None, **sched: int) -> Engine:
    return Engine(
        EngineConfig(
            model=ModelConfig(source=str(model_dir), dtype="float32"),
            cache=cache or CacheConfig(memory_gib=0.25),
            scheduler=SchedulerConfig(**sched),
        )
    )


def _requests(model_dir: Path, params: list[SamplingParams]) -> list[Request]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [Request(str(i), tuple(tokenizer.encode(p)), params[i]) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("qwen3")


def test_greedy_batch_invariance(model_dir: Path) -> None:
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)] * len(PROMPTS)
    requests = _requests(model_dir, params)

    engine = _engine(model_dir)
    alone = [list(engine.generate([r])[0].token_ids) for r in requests]
    together = [list(c.token_ids) for c in engine.generate(requests)]

    chunked_engine = _engine(model_dir, max_num_batched_tokens=7, max_num_seqs=5)
    chunked = [list(c.token_ids) for c in chunked_engine.generate(requests)]

    # 10 pages of 16 tokens cannot hold 12 sequences of ~30-180 tokens at once.
    small = _engine(model_dir, cache=CacheConfig(block_size=16, num_blocks=20))
    preempted = [list(c.token_ids) for c in small.generate(requests)]
    assert small.stats().num_preemptions > 0

    assert all(len(t) == MAX_NEW for t in alone)
    assert together == alone
    assert chunked == alone
    assert preempted == alone
    for eng in (engine, chunked_engine, small):
        stats = eng.stats()
        assert stats.num_free_blocks == stats.num_total_blocks  # every page came back


def test_seeded_sampling_is_independent_of_batch_composition(model_dir: Path) -> None:
    seeded = [
        SamplingParams(
            temperature=1.0, top_p=0.9, top_k=50, seed=100 + i, max_tokens=MAX_NEW, ignore_eos=True
        )
        for i in range(len(PROMPTS))
    ]
    requests = _requests(model_dir, seeded)
    engine = _engine(model_dir)
    alone = [list(engine.generate([r])[0].token_ids) for r in requests[:4]]
    together = [list(c.token_ids) for c in engine.generate(requests[::-1])][::-1][:4]
    small = _engine(
        model_dir, cache=CacheConfig(block_size=16, num_blocks=20), max_num_batched_tokens=9
    )
    constrained = [list(c.token_ids) for c in small.generate(requests)][:4]
    assert together == alone
    assert constrained == alone
    # Different seeds give different samples (the seed is really used).
    assert len({tuple(t) for t in alone}) == len(alone)


def test_stop_string_and_detokenized_text(smollm2_dir: Path) -> None:
    engine = _engine(smollm2_dir)
    tokenizer = engine.tokenizer
    base = {"messages": [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]}
    full = engine.generate(
        [{**base, "id": "full", "params": {"temperature": 0, "max_tokens": 60}}]
    )[0]
    assert full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
    # A stop string spanning several tokens ("5", "\n", "6"), matched on the text.
    stop = "5\n6"
    assert stop in full.text, full.text
    cut = engine.generate(
        [{**base, "id": "cut", "params": {"temperature": 0, "max_tokens": 60, "stop": [stop]}}]
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert len(cut.token_ids) < len(full.token_ids)
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_bad_requests_get_errors_and_others_run(smollm2_dir: Path) -> None:
    engine = _engine(smollm2_dir)
    items = [
        {"id": "ok", "prompt": "Hello", "params": {"max_tokens": 4}},
        {"id": "empty", "prompt": ""},
        {"id": "long", "prompt_token_ids": [1] * (engine.max_model_len + 5)},
        {"id": "badparam", "prompt": "x", "params": {"temperature": -1}},
        {"id": "unknown", "prompt": "x", "params": {"nucleus": 0.5}},
        # Once overflowed the sampler's int64 tensor and failed every request of the step.
        {
            "id": "stopvocab",
            "prompt": "x",
            "params": {"stop_token_ids": [2**64 - 1], "min_tokens": 2},
        },
        {"id": "stopvocab2", "prompt": "x", "params": {"stop_token_ids": [engine.vocab_size]}},
    ]
    results = {c.request_id: c for c in engine.generate(items)}
    assert results["ok"].error is None and results["ok"].usage.completion_tokens == 4
    for name in ("stopvocab", "stopvocab2"):
        assert results[name].error["code"] == "invalid_params"
        assert "outside the vocabulary" in results[name].error["message"]
    assert results["empty"].error["code"] == "empty_prompt"
    assert results["long"].error["code"] == "prompt_too_long"
    assert results["badparam"].error["code"] == "invalid_params"
    assert results["unknown"].error["code"] == "invalid_params"


def test_warm_up_leaves_the_engine_as_it_found_it(model_dir: Path) -> None:
    """Unseeded sampling draws the same tokens after a warm-up (it is greedy, so the engine's
    generator is untouched), and the counters stats() reports start from zero."""
    params = [SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True)] * len(PROMPTS)
    cold = _engine(model_dir)
    expected = [c.token_ids for c in cold.generate(_requests(model_dir, params))]
    warm = _engine(model_dir)
    warm.warm_up()
    stats = warm.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_preemptions) == (0, 0, 0)
    assert stats.prefix_cache_queries == 0 and stats.num_free_blocks == stats.num_total_blocks
    assert [c.token_ids for c in warm.generate(_requests(model_dir, params))] == expected
