"""Engine stage: the engine in its own thread, stepping while work exists, fed by a thread-safe inbox.

The event loop never touches the engine: it posts add/abort commands to the
inbox, and the thread drains them between steps (so new sequences join the
running batch at the next step). Each step's outputs go back to the event loop
in one `loop.call_soon_threadsafe` call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from worker.engine.sequence import Request, TokenOutput
from worker.errors import RequestError
from worker.service.metrics import Metrics

if TYPE_CHECKING:
    from worker.engine.engine import Engine

log = logging.getLogger(__name__)

# Abort leftovers on stop: each step() reports at most one round of aborts.
_STOP_FLUSH_STEPS = 4
# After a failed step with nothing left to fail, back off instead of spinning hot.
_FAILURE_BACKOFF_S = 0.05


@dataclass(frozen=True)
class EngineEvent:
    """What one pass of the engine thread produced: step outputs and requests it failed."""

    outputs: list[TokenOutput] = field(default_factory=list)
    failures: list[tuple[str, RequestError]] = field(default_factory=list)
    crashed: bool = False  # the engine thread died; nothing more will come


@dataclass(frozen=True)
class _Add:
    request: Request


@dataclass(frozen=True)
class _Abort:
    request_id: str
    reason: str


@dataclass(frozen=True)
class _Stop:
    pass


class EngineLoop:
    """Owns the engine thread. `add`/`abort`/`stop` are safe to call from any thread.

    on_event: called on `loop`'s thread with each non-empty EngineEvent.
    """

    def __init__(
        self,
        engine: Engine,
        loop: asyncio.AbstractEventLoop,
        on_event: Callable[[EngineEvent], None],
        metrics: Metrics | None = None,
        host: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.engine = engine
        self._loop = loop
        self._on_event = on_event
        self._metrics = metrics if metrics is not None else Metrics()
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._active: set[str] = set()
        self._host = host
        self._started = False
        self._finished = threading.Event()
        self.num_steps = 0

    def start(self) -> None:
        """Run the loop on its own thread, or hand it to `host` (e.g. the main thread)."""
        self._started = True
        if self._host is not None:
            self._host(self._run)
        else:
            threading.Thread(target=self._run, name="headrace-engine", daemon=True).start()

    def add(self, request: Request) -> None:
        self._inbox.put(_Add(request))

    def abort(self, request_id: str, reason: str = "abort") -> None:
        self._inbox.put(_Abort(request_id, reason))

    def stop(self, timeout: float | None = None) -> None:
        """Abort whatever still runs (freeing its KV blocks) and join the thread."""
        self._inbox.put(_Stop())
        if self._started:
            self._finished.wait(timeout)

    @property
    def alive(self) -> bool:
        return self._started and not self._finished.is_set()

    # -- engine thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:
            # Per-step errors are handled in _step; this is a bug in the loop itself.
            log.critical("engine thread crashed", exc_info=True)
            with contextlib.suppress(RuntimeError):  # the event loop may be gone already
                self._loop.call_soon_threadsafe(self._on_event, EngineEvent(crashed=True))
        finally:
            self._finished.set()

    def _serve(self) -> None:
        while True:
            event = EngineEvent()
            # Idle → block on the inbox; busy → only take what is already there.
            block = not self.engine.has_unfinished_requests()
            for command in self._drain(block):
                if isinstance(command, _Stop):
                    self._shutdown()
                    return
                self._apply(command, event)
            if self.engine.has_unfinished_requests():
                self._step(event)
            if event.outputs or event.failures:
                self._loop.call_soon_threadsafe(self._on_event, event)

    def _drain(self, block: bool) -> list[_Add | _Abort | _Stop]:
        commands = [self._inbox.get()] if block else []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: _Add | _Abort, event: EngineEvent) -> None:
        if isinstance(command, _Abort):
            self._safe_abort(command.request_id, command.reason)
            return
        request_id = command.request.request_id
        try:
            self.engine.add_request(command.request)
        except RequestError as err:
            event.failures.append((request_id, err))
        except Exception as exc:  # a bad request must never take the worker down
            log.exception("engine rejected %s", request_id)
            event.failures.append((request_id, RequestError("internal", repr(exc))))
        else:
            self._active.add(request_id)

    def _step(self, event: EngineEvent) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            # The engine isolates failures of the forward pass and sampling to their requests
            # (finish_reason "error"); what escapes is engine-wide: fail every active request.
            log.exception("engine step failed; failing %d requests", len(self._active))
            error = RequestError("internal", f"engine step failed ({type(exc).__name__})")
            for request_id in self._active:
                event.failures.append((request_id, error))
                self._safe_abort(request_id)
            if not self._active:
                time.sleep(_FAILURE_BACKOFF_S)
            self._active.clear()
            return
        self.num_steps += 1
        self._metrics.observe_step(self.engine.stats())
        for out in outputs:
            if out.finished:
                self._active.discard(out.request_id)
            if out.error is not None:
                event.failures.append((out.request_id, out.error))
            else:
                event.outputs.append(out)

    def _safe_abort(self, request_id: str, reason: str = "abort") -> None:
        try:
            self.engine.abort_request(request_id, reason)
        except Exception:  # the engine is already in trouble; freeing is best effort
            log.exception("abort of %s failed", request_id)

    def _shutdown(self) -> None:
        for request_id in list(self._active):
            self._safe_abort(request_id)
        self._active.clear()
        # Flush the abort reports so a reused engine starts clean.
        for _ in range(_STOP_FLUSH_STEPS):
            if not self.engine.has_unfinished_requests():
                break
            try:
                self.engine.step()
            except Exception:
                log.exception("engine step failed during shutdown")
                break
