"""bench/anchors/run_anchors.py --rounds: each engine's median round, not its best."""

from __future__ import annotations

from bench.anchors.run_anchors import Result, median_of_rounds


def _run(engine: str, workload: str, wall_s: float) -> Result:
    return Result(engine, workload, num_requests=4, output_tokens=1000, wall_s=wall_s, note="x")


def test_median_of_rounds_takes_each_engines_middle_run() -> None:
    rounds = [
        [_run("a", "uniform", 2.0), _run("b", "uniform", 4.0), _run("a", "mixed", 5.0)],
        [_run("a", "uniform", 1.0), _run("b", "uniform", 8.0), _run("a", "mixed", 10.0)],
        [_run("a", "uniform", 4.0), _run("b", "uniform", 5.0), _run("a", "mixed", 4.0)],
    ]
    out = {(r.engine, r.workload): r for r in median_of_rounds(rounds)}
    assert out["a", "uniform"].output_tok_s == 500  # of 500, 1000, 250
    assert out["b", "uniform"].output_tok_s == 200  # of 250, 125, 200
    assert out["a", "mixed"].output_tok_s == 200  # of 200, 100, 250
    assert out["a", "uniform"].note == "x; median of 3 rounds: 500 / 1000 / 250"


def test_even_rounds_take_the_lower_middle_and_one_round_is_unchanged() -> None:
    two = median_of_rounds([[_run("a", "single", 1.0)], [_run("a", "single", 2.0)]])
    assert [r.output_tok_s for r in two] == [500]
    one = median_of_rounds([[_run("a", "single", 1.0)]])
    assert one == [_run("a", "single", 1.0)] and one[0].note == "x"
