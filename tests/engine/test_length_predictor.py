"""LengthPredictor: keyed online quantile of completion lengths, hints, bounds, fallback."""

import pytest

from worker.engine.length_predictor import LengthPredictor, PredictorConfig
from worker.params import SamplingParams

P256 = SamplingParams(max_tokens=256)


def test_nothing_is_predicted_until_a_key_has_enough_samples() -> None:
    pred = LengthPredictor(PredictorConfig(min_samples=3))
    for n in (10, 20):
        pred.observe(100, P256, n)
    assert pred.predict(100, P256) is None
    pred.observe(100, P256, 30)
    assert pred.predict(100, P256) == 30


def test_prediction_is_the_nearest_rank_p90_not_the_mean() -> None:
    pred = LengthPredictor()
    for n in range(1, 11):  # 1..10: p90 is 9, the mean 5.5
        pred.observe(64, P256, n * 10)
    assert pred.predict(64, P256) == 90


def test_keys_split_by_stop_max_tokens_and_prompt_bucket() -> None:
    pred = LengthPredictor(PredictorConfig(min_samples=2))
    stop = SamplingParams(max_tokens=256, stop_token_ids=(5,))
    for _ in range(2):
        pred.observe(100, P256, 250)
        pred.observe(100, stop, 16)
        pred.observe(100, SamplingParams(max_tokens=40), 40)
    assert pred.predict(100, P256) == 250
    assert pred.predict(100, stop) == 16
    assert pred.predict(100, SamplingParams(max_tokens=33)) == 33  # same bucket (64), bounded
    assert pred.predict(100, SamplingParams(max_tokens=20)) is None  # bucket 32: unseen
    assert pred.predict(100, SamplingParams(max_tokens=256, stop=("\n",))) == 16  # a stop too


def test_an_unseen_prompt_bucket_falls_back_to_the_coarse_key() -> None:
    pred = LengthPredictor(PredictorConfig(min_samples=2))
    for n in (10, 12):
        pred.observe(100, P256, n)  # prompt bucket 128
    for n in (200, 220):
        pred.observe(1000, P256, n)  # prompt bucket 1024
    assert pred.predict(120, P256) == 12  # its own bucket
    assert pred.predict(3000, P256) == 220  # bucket 4096 unseen: all prompt lengths


def test_hint_overrides_and_everything_is_bounded_by_max_tokens() -> None:
    pred = LengthPredictor(PredictorConfig(min_samples=1))
    short = SamplingParams(max_tokens=8)
    assert pred.predict(10, short, length_hint=3) == 3  # without any sample
    assert pred.predict(10, short, length_hint=100) == 8
    pred.observe(10, SamplingParams(max_tokens=5), 5)
    pred.observe(10, SamplingParams(max_tokens=5), 5)
    assert pred.predict(10, SamplingParams(max_tokens=6)) == 5
    assert pred.predict(10, SamplingParams(max_tokens=6), length_hint=2) == 2


def test_window_keeps_the_newest_samples_so_it_adapts() -> None:
    pred = LengthPredictor(PredictorConfig(min_samples=2, window=4))
    for _ in range(4):
        pred.observe(10, P256, 200)
    assert pred.predict(10, P256) == 200
    for _ in range(4):
        pred.observe(10, P256, 20)
    assert pred.predict(10, P256) == 20
    pred.clear()
    assert pred.predict(10, P256) is None and pred.num_keys == 0


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        PredictorConfig(quantile=0.0)
    with pytest.raises(ValueError):
        PredictorConfig(min_samples=10, window=4)
