"""Key layout agreement (every stage, producer included): one shard count per namespace, scripts on any deployment.

Producers and workers of a namespace must shard its jobs the same way, or a job lands
on a shard nobody reads. The first of them to connect writes its layout
(`Keys.layout_value`: the shard count, `t` when tagged) to `Keys.layout`; every later
one compares, and refuses to run on a mismatch (`LayoutMismatchError`) instead of
silently losing jobs. A Redis that lost its data (a restart without persistence)
has lost the key too: the next one to connect writes it again.
Torch-free: the producer imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.commands.core import AsyncScript, Script

from worker.keys import Keys


class LayoutMismatchError(ValueError):
    """This process's key layout differs from the one recorded in Redis for its namespace."""

    def __init__(self, keys: Keys, recorded: str) -> None:
        super().__init__(
            f"namespace {keys.namespace!r} is laid out as {_describe(recorded)} in Redis "
            f"({keys.layout} = {recorded!r}) but this process uses {_describe(keys.layout_value)}: "
            "give producers and workers the same `shards` (the same Redis URL)"
        )
        self.recorded = recorded


async def agree_layout(client: Any, keys: Keys) -> None:
    """Record this layout unless one is; raise LayoutMismatchError if another one is."""
    await client.set(keys.layout, keys.layout_value, nx=True)
    _check(keys, await client.get(keys.layout))


def agree_layout_sync(client: Any, keys: Keys) -> None:
    """`agree_layout` on a sync client."""
    client.set(keys.layout, keys.layout_value, nx=True)
    _check(keys, client.get(keys.layout))


def recorded_layout(client: Any, keys: Keys) -> str | None:
    """The layout recorded for the namespace (sync client), None when none is."""
    value = client.get(keys.layout)
    return None if value is None else _text(value)


def _check(keys: Keys, recorded: bytes | str | None) -> None:
    # None: someone deleted it between our SET NX and GET (a FLUSHALL): nothing to compare.
    if recorded is not None and _text(recorded) != keys.layout_value:
        raise LayoutMismatchError(keys, _text(recorded))


def _describe(value: str) -> str:
    shards = value.rstrip("t")
    tag = ", hash-tagged" if value.endswith("t") else ""
    return f"{shards} shard{'s' if shards != '1' else ''}{tag}"


def queue_script(
    pipe: Any, script: AsyncScript | Script, keys: Sequence[str], args: Sequence[Any]
) -> None:
    """Queue `script` on a pipeline: EVALSHA (loaded by the pipeline if Redis lacks it) on
    one node or Sentinel; EVAL on a cluster, whose pipelines load no scripts (each node
    caches what it compiled, so only the bytes are sent again)."""
    scripts = getattr(pipe, "scripts", None)
    if scripts is None:
        pipe.eval(script.script, len(keys), *keys, *args)
        return
    scripts.add(script)
    pipe.evalsha(script.sha, len(keys), *keys, *args)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
