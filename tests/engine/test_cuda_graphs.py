"""Decode steps from persistent, padded buffers (`worker.engine.cuda_graphs`) against eager.

On CPU the buffers are filled and padded exactly as for a CUDA graph, and the model runs
eagerly on them (`capture=False`): greedy tokens must equal the ordinary eager path's, and
logprobs agree to rounding, for batches that are not bucket sizes. On CUDA the engine's captured graphs must give
the same greedy tokens as `enforce_eager` (the CPU tests run there too, uncaptured).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from worker.cli.bulk import local_worker_flags
from worker.cli.bulk import register as register_bulk
from worker.cli.options import (
    add_arguments,
    add_engine_args,
    engine_config_from_args,
    worker_config_from_args,
    worker_config_from_env,
)
from worker.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from worker.engine.cuda_graphs import bucket_sizes
from worker.engine.engine import Engine
from worker.engine.sequence import Request
from worker.params import SamplingParams

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _engine(model_dir, kv: str = "auto", enforce_eager: bool = False) -> Engine:
    return Engine(
        EngineConfig(
            model=ModelConfig(source=str(model_dir), dtype="float32", max_model_len=256),
            # No prefix caching: both runs must prefill alike (int8 K/V read back from a hit).
            cache=CacheConfig(memory_gib=0.05, dtype=kv, enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=8),
            enforce_eager=enforce_eager,
        )
    )


def _run(engine: Engine, tag: str) -> list[tuple]:
    """Greedy tokens and logprobs of 7 requests finishing one after another, so the decode
    batch shrinks 7 → 1 through sizes that are mostly not buckets."""
    gen = torch.Generator().manual_seed(0)
    requests = [
        Request(
            f"{tag}{i}",
            tuple(torch.randint(3, 4000, (5 + 9 * i,), generator=gen).tolist()),
            SamplingParams(temperature=0.0, max_tokens=4 + 2 * i, ignore_eos=True, logprobs=1),
        )
        for i in range(7)
    ]
    return [(c.token_ids, [lp.logprob for lp in c.logprobs]) for c in engine.generate(requests)]


def test_bucket_sizes_cover_every_batch() -> None:
    assert bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert bucket_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(1000)[-1] == 256  # larger batches run eagerly


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_padded_buffers_match_the_eager_path(kv: str, tiny_model_dir) -> None:
    engine = _engine(tiny_model_dir("llama"), kv, enforce_eager=True)
    runner = engine.runner
    assert runner.decode_graphs is None
    eager = _run(engine, "eager")
    runner.enable_decode_graphs((1, 2, 4, 8), engine.max_model_len, capture=False)
    graphs = runner.decode_graphs
    assert graphs is not None
    batches: list[int] = []
    run = graphs.run

    def counted(input_ids: list[int], *args: object) -> torch.Tensor:
        batches.append(len(input_ids))
        return run(input_ids, *args)

    graphs.run = counted  # type: ignore[method-assign]
    padded = _run(engine, "padded")
    assert [t for t, _ in padded] == [t for t, _ in eager]
    # A padded batch's GEMMs have more rows, which may change their rounding (~1e-7).
    for (_, got), (_, want) in zip(padded, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert {3, 5, 6, 7} <= set(batches)  # padded to 4 and 8


def test_padded_rows_write_only_the_spare_page(tiny_model_dir) -> None:
    engine = _engine(tiny_model_dir("llama"), enforce_eager=True)
    runner = engine.runner
    runner.enable_decode_graphs((4,), engine.max_model_len, capture=False)
    _run(engine, "a")
    pages = runner.kv_caches[0].key
    assert pages[runner.pad_block].abs().sum() > 0  # padded rows wrote there
    graphs = runner.decode_graphs
    assert graphs is not None
    assert graphs.bucket(3) == 4 and graphs.can_run(0, 4) and not graphs.can_run(1, 2)
    assert not graphs.can_run(0, 5)


def test_capture_needs_cuda(tiny_model_dir) -> None:
    engine = _engine(tiny_model_dir("llama"))
    if engine.device.type == "cuda":
        pytest.skip("checks that capture is refused without CUDA; this host has a CUDA device")
    assert engine.runner.decode_graphs is None  # never on CPU, even without enforce_eager
    with pytest.raises(ValueError, match="CUDA"):
        engine.runner.enable_decode_graphs((1, 2), engine.max_model_len)


@needs_cuda
@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_cuda_graphs_match_enforce_eager(kv: str, tiny_model_dir) -> None:
    graphed = _engine(tiny_model_dir("llama"), kv)
    graphs = graphed.runner.decode_graphs
    assert graphs is not None and graphs._graphs  # captured
    tokens = [t for t, _ in _run(graphed, "g")]
    del graphed, graphs
    eager = _engine(tiny_model_dir("llama"), kv, enforce_eager=True)
    assert eager.runner.decode_graphs is None
    assert tokens == [t for t, _ in _run(eager, "e")]


def test_enforce_eager_flag_and_variable() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert not worker_config_from_env({}).engine.enforce_eager
    assert worker_config_from_env({"HEADRACE_ENFORCE_EAGER": "1"}).engine.enforce_eager
    args = parser.parse_args(["--enforce-eager"])
    assert worker_config_from_args(args, {}).engine.enforce_eager
    args = parser.parse_args(["--no-enforce-eager"])
    assert not worker_config_from_args(args, {"HEADRACE_ENFORCE_EAGER": "1"}).engine.enforce_eager
    generate = argparse.ArgumentParser()
    add_engine_args(generate)
    assert engine_config_from_args(generate.parse_args(["--enforce-eager"])).enforce_eager
    assert not engine_config_from_args(generate.parse_args([])).enforce_eager
    bulk = argparse.ArgumentParser().add_subparsers()
    register_bulk(bulk)
    flags = local_worker_flags(bulk.choices["bulk"].parse_args(["i", "-o", "o", "--enforce-eager"]))
    assert flags == ("--enforce-eager",)  # bulk's local worker gets it
    assert worker_config_from_args(parser.parse_args(flags), {}).engine.enforce_eager
