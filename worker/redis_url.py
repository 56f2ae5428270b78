"""Redis connections (every stage, producer included): URLs → clients with one set of options.

A URL names the deployment (see `parse_url`): `redis://` / `rediss://` / `unix://` one
node, `redis+cluster://h1:p1,h2:p2` a Redis Cluster, `redis+sentinel://s1:26379,s2:26379/
mastername` a Sentinel-managed primary (`rediss+cluster://`, `rediss+sentinel://`: the same
over TLS, with `ssl_*` query parameters as `rediss://` takes them); the `shards` query
parameter picks the number of request-stream shards (worker/keys.py). Every headrace Redis client is built here, so each one notices a dead server or a
silently dropped connection within seconds: replies time out, idle sockets are probed
(TCP keepalive), unacknowledged writes give up (TCP_USER_TIMEOUT), pooled connections
idle for a while are pinged before use, and (except in the worker, which retries on its
own terms) a command that hits a dropped connection is sent again on a fresh one.
Torch-free: the producer imports it.
"""

from __future__ import annotations

import math
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.asyncio.sentinel as aiosentinel
import redis.cluster
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from worker.keys import Keys

_MASK = "***"

# Seconds a reply may take (beyond a blocking command's own BLOCK time) before the
# connection counts as dead; also the connect timeout and the idle time before a ping.
DEFAULT_TIMEOUT_S = 5.0
# A blip (a killed connection) is retried on a fresh connection at once; anything longer
# surfaces to the caller.
_RETRIES = 2
_RETRY_BASE_S = 0.05
_RETRY_CAP_S = 0.5
_KEEPALIVE_INTERVAL_S = 1
_KEEPALIVE_PROBES = 3
_CLIENT_NAME_BAD = re.compile(r"[^!-~]")  # CLIENT SETNAME takes printable ASCII, no spaces

SINGLE, CLUSTER, SENTINEL = "single", "cluster", "sentinel"
# scheme → (kind, TLS)
_SCHEMES = {
    "redis+cluster": (CLUSTER, False),
    "rediss+cluster": (CLUSTER, True),
    "redis+sentinel": (SENTINEL, False),
    "rediss+sentinel": (SENTINEL, True),
}
# TLS query parameters of rediss+cluster:// and rediss+sentinel:// (redis-py's keyword
# arguments of the same names; `rediss://` URLs go to redis-py whole, which reads them).
_TLS_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_CERT_REQS = ("none", "optional", "required")
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# Shards of a cluster deployment whose URL names none: enough to spread over a few primaries.
DEFAULT_CLUSTER_SHARDS = 8
MAX_SHARDS = 1024


@dataclass(frozen=True)
class RedisTarget:
    """What a headrace Redis URL names.

    kind: SINGLE (`url` is what redis-py gets, without headrace's own parameters),
        CLUSTER (`nodes`: startup nodes) or SENTINEL (`nodes`: the sentinels,
        `service`: the primary's name as the sentinels know it).
    shards: request-stream shards (`?shards=N`): 1 by default on one node or Sentinel
        (today's key names), DEFAULT_CLUSTER_SHARDS on a cluster.
    """

    kind: str
    url: str = ""
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    shards: int = 1
    # CLUSTER and SENTINEL over TLS: redis-py's ssl keyword arguments (empty: plain TCP).
    tls: tuple[tuple[str, Any], ...] = ()

    @property
    def tagged(self) -> bool:
        """Whether key names carry a hash tag: always on a cluster, else when sharded."""
        return self.kind == CLUSTER or self.shards > 1

    def keys(self, namespace: str) -> Keys:
        """The key layout of `namespace` on this deployment."""
        return Keys(namespace, shards=self.shards, tagged=self.tagged)


def parse_url(url: str) -> RedisTarget:
    """Parse a headrace Redis URL (see the module docstring). Raises ValueError."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {k: v for k, v in query if k in ("shards", "db", "sentinel_password", *_TLS_PARAMS)}
    kind, tls = _SCHEMES.get(parts.scheme.lower(), (SINGLE, False))
    default = DEFAULT_CLUSTER_SHARDS if kind == CLUSTER else 1
    shards = _int(own.get("shards", str(default)), "shards")
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be in [1, {MAX_SHARDS}], got {shards}")
    if kind == SINGLE:
        plain = url
        if "shards" in own:  # redis-py must not see it; other URLs pass through as given
            rest = [(k, v) for k, v in query if k != "shards"]
            plain = urlunsplit(parts._replace(query=urlencode(rest)))
        return RedisTarget(SINGLE, url=plain, shards=shards)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = tuple(_node(h, 26379 if kind == SENTINEL else 6379) for h in hosts.split(","))
    path = [p for p in parts.path.split("/") if p]
    service, db = "", _int(own.get("db", "0"), "db")
    if kind == SENTINEL:
        if not path:
            raise ValueError("a redis+sentinel:// URL names the primary: .../mastername")
        service = unquote(path[0])
        db = _int(path[1], "db") if len(path) > 1 else db
    elif path or db:
        raise ValueError("a Redis Cluster has only database 0: no path or db in the URL")
    return RedisTarget(
        kind,
        nodes=nodes,
        service=service,
        db=db,
        username=unquote(username) or None,
        password=unquote(password) if userinfo and ":" in userinfo else None,
        sentinel_password=own.get("sentinel_password"),
        shards=shards,
        tls=_tls_options(own) if tls else (),
    )


def _tls_options(params: dict[str, str]) -> tuple[tuple[str, Any], ...]:
    """redis-py's ssl keyword arguments from a rediss+cluster/sentinel URL's query (values
    already unquoted by parse_qsl)."""
    options: dict[str, Any] = {"ssl": True, **{k: params[k] for k in _TLS_PARAMS if k in params}}
    if "ssl_cert_reqs" in options:
        options["ssl_cert_reqs"] = options["ssl_cert_reqs"].lower()
        if options["ssl_cert_reqs"] not in _CERT_REQS:
            raise ValueError(
                f"ssl_cert_reqs must be one of {_CERT_REQS}, got {params['ssl_cert_reqs']!r}"
            )
    if "ssl_check_hostname" in options:
        flag = options["ssl_check_hostname"].lower()
        if flag not in _BOOLS:
            raise ValueError(f"ssl_check_hostname must be true or false, got {flag!r}")
        options["ssl_check_hostname"] = _BOOLS[flag]
    return tuple(options.items())


def keys_for(url: str | None, namespace: str) -> Keys:
    """The key layout a deployment uses (None: an embedded single node)."""
    return Keys(namespace) if url is None else parse_url(url).keys(namespace)


def _node(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = port, str(default_port)
    host = host.strip("[]")
    if not host:
        raise ValueError(f"bad host:port {text!r} in a Redis URL")
    return host, _int(port, "port")


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {text!r}") from None


def connection_options(timeout_s: float = DEFAULT_TIMEOUT_S, block_ms: int = 0) -> dict[str, Any]:
    """redis-py keyword arguments shared by the sync and asyncio clients.

    block_ms: the longest BLOCK any command on this client asks for (XREAD, XREADGROUP):
        the socket timeout covers that wait plus `timeout_s`, so a blocked read is never
        mistaken for a dead server.
    """
    if timeout_s <= 0 or block_ms < 0:
        raise ValueError("timeout_s must be > 0 and block_ms >= 0")
    return {
        "socket_timeout": timeout_s + block_ms / 1000,
        "socket_connect_timeout": timeout_s,
        "socket_keepalive": True,
        "socket_keepalive_options": _keepalive_options(timeout_s),
        "health_check_interval": timeout_s,
    }


def _keepalive_options(timeout_s: float) -> dict[int, int]:
    """Probe a connection idle for `timeout_s`; give it up a few unanswered probes later."""
    idle = max(1, math.ceil(timeout_s))
    wanted = {
        # Linux names it TCP_KEEPIDLE, macOS TCP_KEEPALIVE; some platforms have neither.
        "TCP_KEEPIDLE": idle,
        "TCP_KEEPALIVE": idle,
        "TCP_KEEPINTVL": _KEEPALIVE_INTERVAL_S,
        "TCP_KEEPCNT": _KEEPALIVE_PROBES,
        # Keepalive never probes a socket with unacknowledged data (a PING sent into a
        # black hole): without this, such a socket waits out ~15 minutes of retransmits.
        "TCP_USER_TIMEOUT": 1000 * (idle + _KEEPALIVE_INTERVAL_S * _KEEPALIVE_PROBES),
    }
    options: dict[int, int] = {}
    for name, value in wanted.items():
        constant = getattr(socket, name, None)
        if constant is not None:
            options.setdefault(constant, value)
    return options


def _backoff() -> EqualJitterBackoff:
    return EqualJitterBackoff(cap=_RETRY_CAP_S, base=_RETRY_BASE_S)


def connect(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, block_ms: int = 0) -> Any:
    """A sync client for `url` with the shared options (see `connection_options`):
    redis.Redis, redis.cluster.RedisCluster, or a Sentinel-managed primary's redis.Redis."""
    target = parse_url(url)
    options = {"retry": Retry(_backoff(), _RETRIES), **connection_options(timeout_s, block_ms)}
    if target.kind == SINGLE:
        return redis.Redis.from_url(target.url, **options)
    options.update(target.tls)
    if target.kind == CLUSTER:
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in target.nodes]
        return redis.cluster.RedisCluster(
            startup_nodes=nodes, username=target.username, password=target.password, **options
        )
    sentinel = redis.sentinel.Sentinel(
        list(target.nodes), sentinel_kwargs=_sentinel_kwargs(target, timeout_s), **options
    )
    return sentinel.master_for(
        target.service, db=target.db, username=target.username, password=target.password
    )


def connect_async(
    url: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    block_ms: int = 0,
    retries: int = _RETRIES,
    client_name: str | None = None,
) -> Any:
    """An asyncio client for `url` with the shared options (see `connection_options`):
    redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster, or a Sentinel-managed
    primary's redis.asyncio.Redis (which finds the new primary after a failover).

    retries: how often redis-py itself resends a command after a connection error; the
        worker passes 0, so that every failure reaches its own retry loop, which knows
        when a lost reply may have delivered entries (worker/service/resilience.py).
    client_name: shown by CLIENT LIST (spaces and control characters become `_`).
    """
    target = parse_url(url)
    options = {
        "retry": AsyncRetry(_backoff(), retries),
        "client_name": None if client_name is None else _CLIENT_NAME_BAD.sub("_", client_name),
        **connection_options(timeout_s, block_ms),
    }
    if target.kind == SINGLE:
        return aioredis.Redis.from_url(target.url, **options)
    options.update(target.tls)
    if target.kind == CLUSTER:
        nodes = [aiocluster.ClusterNode(h, p) for h, p in target.nodes]
        return aiocluster.RedisCluster(
            startup_nodes=nodes, username=target.username, password=target.password, **options
        )
    sentinel = aiosentinel.Sentinel(
        list(target.nodes), sentinel_kwargs=_sentinel_kwargs(target, timeout_s), **options
    )
    return sentinel.master_for(
        target.service, db=target.db, username=target.username, password=target.password
    )


def is_cluster(client: Any) -> bool:
    """Whether `client` talks to a Redis Cluster (sync or asyncio)."""
    return isinstance(client, (aiocluster.RedisCluster, redis.cluster.RedisCluster))


def _sentinel_kwargs(target: RedisTarget, timeout_s: float) -> dict[str, Any]:
    """Options of the connections to the sentinels themselves (quick to give up on one)."""
    kwargs: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    kwargs.update(target.tls)  # rediss+sentinel://: the sentinels speak TLS too
    if target.sentinel_password:
        kwargs["password"] = target.sentinel_password
    return kwargs


def redact_url(url: str) -> str:
    """`redis://user:secret@host:6379/0?password=x` → `redis://user:***@host:6379/0?password=***`.

    Anything that does not parse as a URL is masked whole rather than shown.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:  # user:password or :password; a bare user name is shown
                userinfo = userinfo.split(":", 1)[0] + ":" + _MASK
            netloc = f"{userinfo}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            secret = ("password", "sentinel_password")
            query = urlencode(
                [(k, _MASK if k.lower() in secret else v) for k, v in pairs], safe="*,"
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return _MASK
