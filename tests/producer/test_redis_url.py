"""Redis connections: every client notices a dead peer within seconds; URLs never show a password."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import pytest

from worker.redis_url import (
    DEFAULT_TIMEOUT_S,
    connect,
    connect_async,
    connection_options,
    redact_url,
)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:s3cret@host:6379", "redis://:***@host:6379"),
        ("rediss://user:p%40ss@host/1", "rediss://user:***@host/1"),
        ("redis://user@host", "redis://user@host"),  # a user name alone is no secret
        ("redis://host/0?password=s3cret&db=1", "redis://host/0?password=***&db=1"),
        ("unix://:s3cret@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
    ],
)
def test_passwords_are_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_unparseable_urls_are_masked_whole() -> None:
    assert redact_url("redis://[::1") == "***"


def test_connection_options_notice_a_dead_peer_within_seconds() -> None:
    options = connection_options(timeout_s=2.0, block_ms=1500)
    # A blocked XREAD(GROUP) is not a dead server: the socket waits for BLOCK plus the timeout.
    assert options["socket_timeout"] == 3.5 and options["socket_connect_timeout"] == 2.0
    assert options["socket_keepalive"] and options["health_check_interval"] == 2.0
    keepalive = options["socket_keepalive_options"]
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert keepalive[socket.TCP_KEEPIDLE] == 2 and keepalive[socket.TCP_KEEPCNT] == 3
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        assert keepalive[socket.TCP_USER_TIMEOUT] == 5000  # 2 s idle + 3 probes 1 s apart
    with pytest.raises(ValueError):
        connection_options(timeout_s=0)


def test_clients_connect_with_keepalive_on_the_socket(redis_url: str) -> None:
    client = connect(redis_url)
    try:
        assert client.ping()
        conn = client.connection_pool.get_connection()
        sock = conn._sock
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
        client.connection_pool.release(conn)
    finally:
        client.close()

    async def named() -> str:
        aclient = connect_async(redis_url, client_name="headrace worker\n1", block_ms=500)
        try:
            kwargs = aclient.connection_pool.connection_kwargs
            assert kwargs["socket_timeout"] == DEFAULT_TIMEOUT_S + 0.5
            name = await aclient.client_getname()
            return name.decode() if isinstance(name, bytes) else name
        finally:
            await aclient.aclose()

    assert asyncio.run(named()) == "headrace_worker_1"  # CLIENT SETNAME takes no spaces


def test_every_redis_client_is_built_by_the_shared_helper() -> None:
    """Options added to connect()/connect_async() reach the worker, producer, bulk and stats."""
    root = Path(__file__).resolve().parents[2]
    built_here = {"worker/redis_url.py", "worker/embedded.py"}  # embedded: a 0.5 s start probe
    offenders = [
        str(path.relative_to(root))
        for package in ("worker", "producer")
        for path in (root / package).rglob("*.py")
        if str(path.relative_to(root)) not in built_here
        and re.search(r"\bRedis\(|\.from_url\(", path.read_text())
    ]
    assert offenders == []
