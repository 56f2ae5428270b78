"""Predicted-length admission end to end: same greedy outputs as fcfs, less recompute; and
the `--admission` flag / HEADRACE_ADMISSION on every verb."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.prompts_data import PROMPTS
from worker.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from worker.engine.engine import Engine
from worker.engine.sequence import Request
from worker.params import SamplingParams


def _engine(model_dir: Path, admission: str) -> Engine:
    # 20 pages of 16 tokens: far less than the 12 requests need at once.
    return Engine(
        EngineConfig(
            model=ModelConfig(source=str(model_dir), dtype="float32"),
            cache=CacheConfig(block_size=16, num_blocks=20),
            scheduler=SchedulerConfig(admission=admission),
        )
    )


def _requests(model_dir: Path, tag: str) -> list[Request]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(temperature=0.0, max_tokens=(8, 40)[i % 2], ignore_eos=True)
        out.append(Request(f"{tag}{i}", tuple(tokenizer.encode(prompt)), params))
    return out


def test_predicted_admission_keeps_greedy_outputs_and_recomputes_less(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("qwen3")
    outputs, stats = {}, {}
    for admission in ("fcfs", "predicted"):
        engine = _engine(model_dir, admission)
        # The predictor learns from finished requests, as in a worker (8 of each kind).
        engine.generate(_requests(model_dir, "warm-") + _requests(model_dir, "warm2-"))
        before = engine.stats()
        outputs[admission] = [c.token_ids for c in engine.generate(_requests(model_dir, ""))]
        after = engine.stats()
        stats[admission] = (
            after.num_preemptions - before.num_preemptions,
            after.num_recomputed_tokens - before.num_recomputed_tokens,
        )
    assert outputs["predicted"] == outputs["fcfs"]
    assert all(len(t) in (8, 40) for t in outputs["fcfs"])
    fcfs_preempted, fcfs_recomputed = stats["fcfs"]
    assert fcfs_preempted > 0 and fcfs_recomputed > 0  # the pool is really under pressure
    # Predictions are exact here (outputs run to max_tokens), so nothing outgrows them.
    assert stats["predicted"] == (0, 0)


def test_the_admission_flag_and_env_reach_the_scheduler_on_every_verb(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.cli.bulk import local_worker_flags
    from worker.cli.bulk import register as register_bulk
    from worker.cli.options import (
        add_arguments,
        add_engine_args,
        engine_config_from_args,
        worker_config_from_args,
        worker_config_from_env,
    )

    assert worker_config_from_env({}).engine.scheduler.admission == "fcfs"
    env = {"HEADRACE_ADMISSION": "predicted"}
    assert worker_config_from_env(env).engine.scheduler.admission == "predicted"
    with pytest.raises(ValueError, match="HEADRACE_ADMISSION"):
        worker_config_from_env({"HEADRACE_ADMISSION": "lifo"})
    worker = argparse.ArgumentParser()
    add_arguments(worker)
    args = worker.parse_args(["--admission", "fcfs"])
    assert worker_config_from_args(args, env).engine.scheduler.admission == "fcfs"

    generate = argparse.ArgumentParser()
    add_engine_args(generate)  # generate and bench
    config = engine_config_from_args(generate.parse_args(["--admission", "predicted"]))
    assert config.scheduler.admission == "predicted"
    assert config.cache.num_blocks is None
    args = generate.parse_args(["--num-kv-blocks", "64"])
    assert engine_config_from_args(args).cache.num_blocks == 64
    monkeypatch.setenv("HEADRACE_ADMISSION", "predicted")
    from_env = argparse.ArgumentParser()
    add_engine_args(from_env)
    assert engine_config_from_args(from_env.parse_args([])).scheduler.admission == "predicted"

    bulk = argparse.ArgumentParser().add_subparsers()
    register_bulk(bulk)
    flags = local_worker_flags(
        bulk.choices["bulk"].parse_args(["i", "-o", "o", "--admission", "predicted"])
    )
    assert worker_config_from_args(worker.parse_args(flags), {}).engine.scheduler.admission == (
        "predicted"
    )
