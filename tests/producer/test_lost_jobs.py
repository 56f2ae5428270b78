"""The lost-job watch's decisions (no Redis): when a job out of sight counts as lost."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from producer.lost_jobs import LostJobWatch, RedisGoneError, WatchConfig
from producer.submission import DONE, LOST, QUEUED


def watch(**config: float) -> LostJobWatch:
    return LostJobWatch(WatchConfig(**{"lost_after_s": 10.0, "redis_down_s": 60.0, **config}))


def test_a_job_out_of_sight_is_lost_after_the_timeout_once() -> None:
    w = watch()
    w.saw_server("run-1")
    assert w.lost({"a": LOST, "b": QUEUED, "c": DONE}, now=100.0) == []
    assert w.lost({"a": LOST, "b": QUEUED}, now=109.9) == []
    assert w.lost({"a": LOST, "b": LOST}, now=110.0) == ["a"]  # b: out of sight just now
    assert w.lost({"a": LOST, "b": LOST}, now=111.0) == []  # a: its clock restarted
    assert w.lost({"a": QUEUED, "b": LOST}, now=120.0) == ["b"]
    assert w.lost({"a": LOST}, now=125.0) == []  # seen in between: a's clock restarted


def test_jobs_no_longer_in_flight_are_forgotten() -> None:
    w = watch()
    assert w.lost({"a": LOST}, now=0.0) == []
    assert w.lost({}, now=5.0) == []
    assert w.lost({"a": LOST}, now=12.0) == []  # answered and resubmitted: a new clock


def test_a_new_run_id_makes_every_missing_job_lost_at_once() -> None:
    w = watch()
    w.saw_server("run-1")
    w.saw_server("run-1")
    assert w.lost({"a": LOST}, now=0.0) == []
    w.saw_server("run-2")  # restarted or failed over: what is missing now is gone
    assert w.lost({"a": LOST, "b": LOST, "c": QUEUED}, now=1.0) == ["a", "b"]
    assert w.lost({"d": LOST}, now=2.0) == []  # only the check right after the restart


def test_a_lost_connection_makes_missing_jobs_lost_at_once_and_a_long_one_ends_the_run() -> None:
    w = watch(redis_down_s=30.0)
    error = RedisConnectionError("refused")
    w.redis_failed(error, now=0.0)
    w.redis_failed(error, now=30.0)
    with pytest.raises(RedisGoneError, match="unreachable for 31 s"):
        w.redis_failed(error, now=31.0)
    w.redis_ok()
    w.redis_failed(error, now=100.0)  # a new outage starts its own clock
    w.redis_ok()
    assert w.lost({"a": LOST}, now=101.0) == ["a"]


def test_config_rejects_non_positive_intervals() -> None:
    with pytest.raises(ValueError):
        WatchConfig(lost_after_s=0)
