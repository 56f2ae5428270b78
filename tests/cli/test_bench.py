"""`headrace bench throughput`: workload generation, baseline accounting, and a smoke run."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from bench.throughput import load_transformers, run_transformers
from bench.workloads import (
    BenchRequest,
    Workload,
    bimodal_workload,
    mixed_workload,
    sampleable_token_ids,
    shared_prefix_workload,
    uniform_workload,
)
from worker.cli import main


@pytest.fixture(scope="module")
def vocab(smollm2_dir: Path) -> list[int]:
    return sampleable_token_ids(AutoTokenizer.from_pretrained(smollm2_dir))


def test_sampleable_ids_exclude_special_tokens(smollm2_dir: Path, vocab: list[int]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    special = set(tokenizer.all_special_ids)
    assert special and not special & set(vocab)
    assert len(vocab) > 49000 and max(vocab) < len(tokenizer)


def test_mixed_workload_is_log_uniform_and_reproducible(vocab: list[int]) -> None:
    work = mixed_workload(vocab, num_requests=64, seed=0)
    prompts = [len(r.prompt_token_ids) for r in work.requests]
    outputs = [r.output_len for r in work.requests]
    assert len(work.requests) == 64
    assert all(32 <= n <= 512 for n in prompts) and all(16 <= n <= 256 for n in outputs)
    # Log-uniform: the median sits near the geometric mean of the range (128 and 64),
    # far below the arithmetic midpoints (272 and 136).
    assert 80 <= statistics.median(prompts) <= 200
    assert 40 <= statistics.median(outputs) <= 100
    assert work.num_output_tokens == sum(outputs)
    assert mixed_workload(vocab, num_requests=64, seed=0) == work
    assert mixed_workload(vocab, num_requests=64, seed=1) != work


def test_uniform_workload_has_exact_shapes(vocab: list[int]) -> None:
    work = uniform_workload(vocab, prompt_len=33, output_len=7, batch=5)
    assert [(len(r.prompt_token_ids), r.output_len) for r in work.requests] == [(33, 7)] * 5
    assert work.num_prompt_tokens == 165
    with pytest.raises(ValueError):
        uniform_workload(vocab, prompt_len=0, output_len=7, batch=5)


def test_shared_prefix_workload_shares_exactly_its_prefix(vocab: list[int]) -> None:
    work = shared_prefix_workload(vocab, num_requests=64, prefix_len=512, output_len=64)
    prefix = work.requests[0].prompt_token_ids[:512]
    assert all(r.prompt_token_ids[:512] == prefix for r in work.requests)
    suffixes = [len(r.prompt_token_ids) - 512 for r in work.requests]
    assert all(32 <= n <= 128 for n in suffixes) and len(set(suffixes)) > 10
    assert len({r.prompt_token_ids[512] for r in work.requests}) > 32  # own tokens after it
    assert {r.output_len for r in work.requests} == {64}
    assert shared_prefix_workload(vocab) == work
    with pytest.raises(ValueError):
        shared_prefix_workload(vocab, suffix_range=(8, 4))


def test_bench_throughput_shared_prefix_runs_with_caching_off_too(
    tiny_model_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dumped = tmp_path / "shared.json"
    argv = ["bench", "throughput", "--model", str(tiny_model_dir("llama")), "--dtype", "float32"]
    argv += ["--workload", "shared-prefix", "--num-requests", "6", "--prefix-len", "40"]
    argv += ["--suffix-range", "3", "9", "--output-len", "4", "--kv-cache-memory", "0.01"]
    argv += ["--max-num-batched-tokens", "32", "--no-baseline", "--dump-workload", str(dumped)]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["workload"].startswith("shared-prefix")
    on, off = report["headrace"], report["no_prefix_cache"]
    assert on["output_tokens"] == off["output_tokens"] == 24
    assert on["prefix_cache_hit_ratio"] > 0 and off["prefix_cache_hit_ratio"] == 0
    assert report["ratio_vs_no_prefix_cache"] == pytest.approx(
        on["output_tokens_per_s"] / off["output_tokens_per_s"]
    )
    assert report["ttft_p50_reduction"] == pytest.approx(off["ttft_p50_s"] / on["ttft_p50_s"])
    saved = Workload.load(dumped)
    assert len(saved.requests) == 6 and saved.name == report["workload"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "headrace (no prefix cache)" in table and "lower with the prefix cache" in table
    # Caching off: nothing to compare against.
    assert main([*argv, "--no-prefix-caching", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["no_prefix_cache"] is None


def test_baseline_counts_only_requested_tokens(tiny_model_dir) -> None:
    model = load_transformers(tiny_model_dir("llama"), "float32", torch.device("cpu"))
    # One padded batch: both rows generate 5 tokens, but only 2 + 5 were asked for.
    work = Workload("t", (BenchRequest((504, 3575, 282), 2), BenchRequest((314, 28), 5)))
    result = run_transformers(model, work, pad_token_id=0, batch_size=16)
    assert result.output_tokens == 7 and result.elapsed_s > 0


def test_bench_throughput_smoke(tiny_model_dir, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "throughput", "--model", str(tiny_model_dir("llama")), "--dtype", "float32"]
    argv += ["--workload", "uniform", "--prompt-len", "8", "--output-len", "4", "--batch", "4"]
    argv += ["--kv-cache-memory", "0.01", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    ours, base = report["headrace"], report["transformers"]
    assert report["num_requests"] == 4 and report["prompt_tokens"] == 32
    assert ours["output_tokens"] == 16 and base["output_tokens"] == 16
    assert ours["output_tokens_per_s"] > 0 and base["output_tokens_per_s"] > 0
    assert report["ratio"] == pytest.approx(
        ours["output_tokens_per_s"] / base["output_tokens_per_s"]
    )
    assert 0 < ours["ttft_p50_s"] <= ours["ttft_p99_s"] <= ours["elapsed_s"]
    assert 0 < ours["tpot_p50_s"] <= ours["tpot_p99_s"]


def test_bench_throughput_table_without_baseline(
    tiny_model_dir, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "throughput", "--model", str(tiny_model_dir("llama")), "--dtype", "float32"]
    argv += ["--workload", "uniform", "--prompt-len", "5", "--output-len", "3", "--batch", "2"]
    argv += ["--kv-cache-memory", "0.01", "--no-baseline"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "headrace" in table and "TTFT" in table and "TPOT" in table
    assert "transformers" not in table and "ratio" not in table


def test_bench_throughput_quantized_config_runs_the_unquantized_engine_too(
    tiny_model_dir, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "throughput", "--model", str(tiny_model_dir("llama")), "--dtype", "float32"]
    argv += ["--workload", "uniform", "--prompt-len", "8", "--output-len", "4", "--batch", "3"]
    argv += ["--kv-cache-memory", "0.01", "--kv-cache-dtype", "int8", "--no-baseline", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"] == "int8-kv" and report["transformers"] is None
    ours, plain = report["headrace"], report["unquantized"]
    assert ours["output_tokens"] == plain["output_tokens"] == 12
    assert report["ratio_vs_unquantized"] == pytest.approx(
        ours["output_tokens_per_s"] / plain["output_tokens_per_s"]
    )


def test_bench_linear_times_each_projection_and_scheme(
    tiny_model_dir, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "linear", "--model", str(tiny_model_dir("llama")), "--tokens", "1,4"]
    assert main([*argv, "--dtype", "float32", "--threads", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["projection"] for r in rows} == {"qkv", "o", "gate_up", "down"}
    assert {r["impl"] for r in rows} == {"float32", "w8a8", "w8a8-served", "w4a16"}
    assert len(rows) == 4 * 2 * 4 and all(r["ms"] > 0 for r in rows)
    for r in rows:
        if r["impl"] == "float32":
            assert r["speedup"] == 1.0


def test_workload_dump_and_load_round_trip(tmp_path: Path, vocab: list[int]) -> None:
    work = mixed_workload(vocab, num_requests=5, seed=3)
    path = tmp_path / "w.json"
    work.dump(path)
    assert Workload.load(path, vocab_size=max(vocab) + 1) == work
    with pytest.raises(ValueError, match="outside"):
        Workload.load(path, vocab_size=10)
    path.write_text(json.dumps({"requests": [{"prompt_token_ids": [], "output_len": 3}]}))
    with pytest.raises(ValueError, match="prompt"):
        Workload.load(path)
    path.write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="not a workload"):
        Workload.load(path)


def test_bench_throughput_single_dumps_and_replays_its_workload(
    tiny_model_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dumped = tmp_path / "single.json"
    argv = ["bench", "throughput", "--model", str(tiny_model_dir("llama")), "--dtype", "float32"]
    argv += ["--kv-cache-memory", "0.01", "--no-baseline", "--json"]
    single = ["--workload", "single", "--prompt-len", "6", "--output-len", "5"]
    assert main([*argv, *single, "--dump-workload", str(dumped)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_requests"] == 1 and report["prompt_tokens"] == 6
    assert report["workload"].startswith("single")
    ours = report["headrace"]
    assert ours["output_tokens"] == 5
    assert ours["requests_per_s"] == pytest.approx(1 / ours["elapsed_s"])
    saved = Workload.load(dumped)
    assert [(len(r.prompt_token_ids), r.output_len) for r in saved.requests] == [(6, 5)]

    assert main([*argv, "--workload-file", str(dumped)]) == 0
    replay = json.loads(capsys.readouterr().out)
    assert replay["workload"] == report["workload"] and replay["headrace"]["output_tokens"] == 5


def test_bench_throughput_reports_the_cpu_and_its_kernels(
    tiny_model_dir, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "throughput", "--model", str(tiny_model_dir("llama")), "--dtype", "bfloat16"]
    argv += ["--workload", "single", "--prompt-len", "4", "--output-len", "2"]
    argv += ["--kv-cache-memory", "0.01", "--no-baseline", "--json"]
    assert main(argv) == 0
    kernels = json.loads(capsys.readouterr().out)["kernels"]
    assert {"cpu_flags", "gemm", "gemm_int8", "attention", "row_ops"} <= set(kernels)
    assert main(argv[:-1]) == 0  # the table lists them too
    assert f"gemm       {kernels['gemm']}" in capsys.readouterr().out


def test_bimodal_workload_has_two_halves_told_apart_only_by_their_stop(vocab: list[int]) -> None:
    work = bimodal_workload(vocab, num_requests=10, seed=2)
    short = [r for r in work.requests if r.needs_stop]
    assert len(short) == 5 and {r.output_len for r in short} == {16}
    assert {r.max_tokens for r in work.requests} == {256}
    assert {r.output_len for r in work.requests if not r.needs_stop} == {256}
    assert work.peak_kv_blocks(16) == sum(
        -(-(len(r.prompt_token_ids) + 256) // 16) for r in work.requests
    )
    assert bimodal_workload(vocab, num_requests=10, seed=2) == work


def test_bench_throughput_compares_admission_policies(
    tiny_model_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vocab = list(range(10, 200))
    path = tmp_path / "bimodal.json"
    bimodal_workload(vocab, 6, prompt_range=(8, 24), short_len=4, long_len=12).dump(path)
    argv = ["bench", "throughput", "--model", str(tiny_model_dir("llama")), "--dtype", "float32"]
    argv += ["--workload-file", str(path), "--num-kv-blocks", "10", "--block-size", "4"]
    argv += ["--max-num-batched-tokens", "32", "--no-baseline", "--compare-admission"]
    argv += ["--warmup-requests", "30"]  # each request 5 times: enough samples of both kinds
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    comparison = report["compare_admission"]
    fcfs, predicted = comparison["fcfs"], comparison["predicted"]
    assert report["admission"] == "predicted" and report["headrace"] == predicted
    assert report["kv_blocks"] == 10 and report["peak_kv_blocks"] > 30
    assert fcfs["output_tokens"] == predicted["output_tokens"]
    assert comparison["outputs_identical"] is True
    assert fcfs["preemptions"] > 0 and fcfs["recomputed_tokens"] > 0  # under KV pressure
    assert predicted["recomputed_tokens"] <= fcfs["recomputed_tokens"]
    assert comparison["tokens_per_s_ratio"] == pytest.approx(
        predicted["output_tokens_per_s"] / fcfs["output_tokens_per_s"]
    )
    assert comparison["warmup"].startswith("30 requests of bimodal")
    # The short half got a stop token from the calibration pass and stops by it.
    saved = Workload.load(path)
    assert sum(r.needs_stop for r in saved.requests) == 3
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "headrace (fcfs)" in table and "headrace (predicted)" in table
    assert "recomputed tokens fcfs" in table and "greedy outputs identical" in table
