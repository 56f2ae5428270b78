"""Redis fixtures: one private redis-server per test session (never the machine's 6379)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from worker.embedded import EmbeddedRedis, start_embedded_redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A redis-server started for this session on a free 127.0.0.1 port, persistence off."""
    server = start_embedded_redis()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """URL of the session server, flushed before each test so tests never see each other."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url
