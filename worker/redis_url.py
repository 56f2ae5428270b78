"""Redis connections (every stage, producer included): one set of client options, URLs as logs show them.

Every headrace Redis client is built here, so each one notices a dead server or a
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
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

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


def connect(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, block_ms: int = 0) -> redis.Redis:
    """A sync client for `url` with the shared options (see `connection_options`)."""
    return redis.Redis.from_url(
        url, retry=Retry(_backoff(), _RETRIES), **connection_options(timeout_s, block_ms)
    )


def connect_async(
    url: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    block_ms: int = 0,
    retries: int = _RETRIES,
    client_name: str | None = None,
) -> aioredis.Redis:
    """An asyncio client for `url` with the shared options (see `connection_options`).

    retries: how often redis-py itself resends a command after a connection error; the
        worker passes 0, so that every failure reaches its own retry loop, which knows
        when a lost reply may have delivered entries (worker/service/resilience.py).
    client_name: shown by CLIENT LIST (spaces and control characters become `_`).
    """
    return aioredis.Redis.from_url(
        url,
        retry=AsyncRetry(_backoff(), retries),
        client_name=None if client_name is None else _CLIENT_NAME_BAD.sub("_", client_name),
        **connection_options(timeout_s, block_ms),
    )


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
            query = urlencode(
                [(k, _MASK if k.lower() == "password" else v) for k, v in pairs], safe="*"
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return _MASK
