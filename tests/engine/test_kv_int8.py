"""The int8 KV cache in the engine: capacity, batch invariance, and closeness to full precision."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.prompts_data import PROMPTS
from worker.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from worker.engine.engine import Engine
from worker.engine.sequence import Request
from worker.params import SamplingParams

TEXT = (
    "The river rose through the spring, and the mill that stood at its bend turned faster "
    "every week. The miller kept a ledger of the days the wheel ran and the sacks it ground; "
    "by midsummer the book was full, and he began another. 河水在春天上涨，磨坊的轮子越转越快。"
    "磨坊主把每天磨出的粮食都记在账本上，到了夏天，账本已经写满了。"
)


def _engine(model_dir: Path, kv: str, dtype: str = "float32", **cache: int | float) -> Engine:
    return Engine(
        EngineConfig(
            model=ModelConfig(source=str(model_dir), dtype=dtype),
            cache=CacheConfig(dtype=kv, **cache),  # type: ignore[arg-type]
            scheduler=SchedulerConfig(),
        )
    )


def test_int8_cache_holds_at_least_1_9x_the_tokens_of_bf16(
    smollm2_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="worker.engine.model_runner"):
        bf16 = _engine(smollm2_dir, "auto", dtype="bfloat16", memory_gib=0.05)
        int8 = _engine(smollm2_dir, "int8", dtype="bfloat16", memory_gib=0.05)
    assert int8.runner.capacity_tokens >= 1.9 * bf16.runner.capacity_tokens
    first = int8.runner.kv_caches[0]
    assert first.key.dtype.is_floating_point is False and first.key_scale is not None
    assert any("KV cache (int8)" in r.message for r in caplog.records)  # capacity is logged


def test_int8_greedy_batch_invariance(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    requests = [Request(str(i), tuple(tokenizer.encode(p)), params) for i, p in enumerate(PROMPTS)]
    engine = _engine(model_dir, "int8", memory_gib=0.05)
    alone = [list(engine.generate([r])[0].token_ids) for r in requests]
    together = [list(c.token_ids) for c in engine.generate(requests)]
    assert together == alone
    # Preemption under a small pool still completes every request, and frees every page.
    small = _engine(model_dir, "int8", block_size=16, num_blocks=20)
    preempted = small.generate(requests)
    assert small.stats().num_preemptions > 0
    assert [len(c.token_ids) for c in preempted] == [16] * len(PROMPTS)
    assert small.stats().num_free_blocks == small.stats().num_total_blocks


def test_int8_cache_scores_close_to_full_precision(smollm2_dir: Path) -> None:
    """Teacher-forced over chunks of 16, so nearly every position attends a quantized prefix."""
    full = _engine(smollm2_dir, "auto", memory_gib=0.05)
    tokens = full.tokenizer.encode(TEXT)
    assert len(tokens) > 64
    ref = full.score(tokens, chunk_size=16)
    del full
    quant = _engine(smollm2_dir, "int8", memory_gib=0.05)
    got = quant.score(tokens, chunk_size=16)
    agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agreement >= 0.97
    # Not the same numbers: the cache really is quantized.
    assert not (got[32:] == ref[32:]).all()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.05
