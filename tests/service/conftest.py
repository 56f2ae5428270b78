"""Fixtures shared by the worker service tests: the tiny llama, one engine per module, a Redis client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.worker_harness import engine_config
from worker.engine.engine import Engine


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Engine:
    return Engine(engine_config(model_dir))


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()
