"""Failure isolation (engine stage): after a step raised, find the requests it raises for.

The failed step is retried on halves of its batch, recursively (bisection). A
group that runs is committed as usual; a request whose step still raises when
it runs alone is to blame. Pure Python over opaque items: the engine passes
its chunks and the two halves of a step (attempt, then commit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Runs allowed per halving level: two isolate one culprit (both halves run: the
# innocent one for its tokens); four also isolate a second culprit in the other half.
_RUNS_PER_LEVEL = 4


def max_runs(num_items: int) -> int:
    """How many retries a failed step of `num_items` gets before the rest is blamed too."""
    return _RUNS_PER_LEVEL * num_items.bit_length()


def bisect(
    items: Sequence[T],
    error: Exception,
    attempt: Callable[[Sequence[T]], R],
    commit: Callable[[Sequence[T], R], None],
    limit: int,
) -> list[tuple[T, Exception]]:
    """`attempt(items)` raised `error`: run halves until every item ran or is blamed.

    Args:
        items: what the failed attempt ran (a batch of one is blamed at once).
        error: the exception of that attempt.
        attempt: runs a group; it must leave no trace when it raises (nothing committed).
        commit: applies a successful group's result; its exceptions propagate (not ours to judge).
        limit: at most this many attempts. Halves not yet tried after that are blamed
            whole, with the exception of the group they came from: a failure that even
            small groups hit does not look like any one request's, and must not be
            retried forever.

    Returns:
        (item, exception) for each item to fail, in `items` order.
    """
    blamed: list[tuple[T, Exception]] = []
    runs = 0

    def settle(group: Sequence[T], exc: Exception) -> None:
        nonlocal runs
        if len(group) == 1:
            blamed.append((group[0], exc))
            return
        mid = len(group) // 2
        for half in (group[:mid], group[mid:]):
            if runs >= limit:
                blamed.extend((item, exc) for item in half)
                continue
            runs += 1
            try:
                result = attempt(half)
            except Exception as half_exc:  # whatever it is, it is this half's
                settle(half, half_exc)
            else:
                commit(half, result)

    settle(items, error)  # recursion depth: log2(len(items))
    return blamed
