"""Redis connections: every client notices a dead peer within seconds; URLs never show a password."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import pytest

from worker.redis_url import (
    CLUSTER,
    DEFAULT_CLUSTER_SHARDS,
    DEFAULT_TIMEOUT_S,
    SENTINEL,
    SINGLE,
    connect,
    connect_async,
    connection_options,
    parse_url,
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


# -- deployments named by URL (worker/redis_url.py: parse_url) ---------------------------------


def test_single_node_urls_pass_through_unchanged() -> None:
    for url in (
        "redis://127.0.0.1:6379/0",
        "rediss://u:p@h:6380/2?ssl_cert_reqs=none",
        "unix:///s",
    ):
        target = parse_url(url)
        assert target.kind == SINGLE and target.url == url and target.shards == 1
        assert not target.tagged and target.keys("hr").requests == "hr:requests"


def test_shards_on_a_single_node_are_stripped_before_redis_py_sees_them() -> None:
    target = parse_url("redis://h:1/0?shards=4&db=0")
    assert target.kind == SINGLE and target.shards == 4 and target.tagged
    assert target.url == "redis://h:1/0?db=0"
    assert target.keys("hr").requests == "{hr:0}:requests"


def test_cluster_urls_name_their_startup_nodes() -> None:
    target = parse_url("redis+cluster://u:s3cret@10.0.0.1:7000,10.0.0.2,[::1]:7002?shards=6")
    assert target.kind == CLUSTER and target.shards == 6 and target.tagged
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert (target.username, target.password) == ("u", "s3cret")
    default = parse_url("redis+cluster://h:7000")
    assert default.shards == DEFAULT_CLUSTER_SHARDS and default.password is None
    assert parse_url("redis+cluster://h:7000/?shards=1").keys("hr").requests == "{hr:0}:requests"


def test_sentinel_urls_name_the_sentinels_and_the_primary() -> None:
    target = parse_url("redis+sentinel://:pw@s1:26379,s2/mymaster/2?sentinel_password=sp")
    assert target.kind == SENTINEL and target.service == "mymaster" and target.db == 2
    assert target.nodes == (("s1", 26379), ("s2", 26379))
    assert target.password == "pw" and target.sentinel_password == "sp" and target.shards == 1
    assert parse_url("redis+sentinel://s1/m?db=3").db == 3


def test_tls_cluster_and_sentinel_urls_carry_redis_py_ssl_options() -> None:
    target = parse_url(
        "rediss+cluster://h1:7000,h2:7001?ssl_ca_certs=/etc/ca%20dir/ca.pem&ssl_cert_reqs=Required"
        "&ssl_check_hostname=false&shards=2"
    )
    assert target.kind == CLUSTER and target.shards == 2
    assert dict(target.tls) == {
        "ssl": True,
        "ssl_ca_certs": "/etc/ca dir/ca.pem",
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": False,
    }
    assert parse_url("redis+cluster://h1:7000?ssl_ca_certs=/x").tls == ()  # plain: ignored
    sentinel = parse_url("rediss+sentinel://s1,s2/mymaster?ssl_certfile=c.pem&ssl_keyfile=k.pem")
    assert sentinel.kind == SENTINEL and sentinel.service == "mymaster"
    assert dict(sentinel.tls) == {"ssl": True, "ssl_certfile": "c.pem", "ssl_keyfile": "k.pem"}


def test_tls_sentinel_clients_speak_tls_to_the_sentinels_and_the_primary() -> None:
    """No server needed: the options of the connections redis-py would open."""
    url = "rediss+sentinel://127.0.0.1:1/mymaster?ssl_ca_certs=/ca.pem"
    for client in (connect(url), connect_async(url)):
        pool = client.connection_pool  # redis-py takes `ssl` to pick the connection class
        assert pool.connection_class.__name__ == "SentinelManagedSSLConnection"
        assert pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"
        sentinel_pool = pool.sentinel_manager.sentinels[0].connection_pool
        assert sentinel_pool.connection_class.__name__ == "SSLConnection"
        assert sentinel_pool.connection_kwargs["ssl_ca_certs"] == "/ca.pem"


@pytest.mark.parametrize(
    "url",
    [
        "rediss+cluster://h:7000?ssl_cert_reqs=maybe",
        "rediss+sentinel://s1/m?ssl_check_hostname=perhaps",
        "redis+sentinel://s1:26379",  # no primary name
        "redis+cluster://h:7000/1",  # a cluster has db 0 only
        "redis+cluster://h:notaport",
        "redis://h?shards=0",
        "redis://h?shards=many",
    ],
)
def test_bad_deployment_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        parse_url(url)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "redis+cluster://u:s3cret@h1:7000,h2:7001?shards=3",
            "redis+cluster://u:***@h1:7000,h2:7001?shards=3",
        ),
        (
            "redis+sentinel://:pw@s1:26379,s2:26379/mymaster?sentinel_password=sp",
            "redis+sentinel://:***@s1:26379,s2:26379/mymaster?sentinel_password=***",
        ),
    ],
)
def test_cluster_and_sentinel_passwords_are_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown
