"""`headrace bench queue`: the test engine answers at once; the table has every cell, counted."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from bench.queue_engine import FixedTokensTestEngine
from worker.cli import main
from worker.engine.sequence import Request


def test_the_test_engine_answers_every_request_in_one_step(smollm2_dir) -> None:
    engine = FixedTokensTestEngine(AutoTokenizer.from_pretrained(smollm2_dir), num_tokens=5)
    assert not engine.has_unfinished_requests()
    engine.add_request(Request("a", (1, 2, 3)))
    engine.add_request(Request("b", (4,)))
    engine.abort_request("b")
    outputs = {o.request_id: o for o in engine.step()}
    assert outputs["a"].new_token_ids == (260,) * 5 and outputs["a"].finish_reason == "length"
    assert outputs["a"].num_prompt_tokens == 3 and outputs["b"].finish_reason == "abort"
    assert not engine.has_unfinished_requests() and engine.step() == []


@pytest.mark.slow
def test_bench_queue_measures_one_node_and_the_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "queue", "--jobs", "40", "--workers", "1,2", "--concurrency", "8", "--json"]
    assert main(args) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [(r["deployment"], r["workers"]) for r in runs] == [
        ("single", 1), ("single", 2), ("cluster", 1), ("cluster", 2)
    ]  # fmt: skip
    for run in runs:
        assert run["jobs"] == 40 and run["jobs_per_s"] > 0 and run["p99_ms"] >= run["p50_ms"] > 0
        # At least the submit script, the read and the final-result script per job.
        assert 3 <= run["commands_per_job"] < 100 and run["redis_cpu_us_per_job"] > 0
