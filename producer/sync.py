"""Client: the blocking producer API, an AsyncClient driven on a private event-loop thread.

No protocol logic lives here; every call is forwarded to the AsyncClient.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from producer.client import AsyncClient
from producer.submission import Submission
from worker.protocol import Result

T = TypeVar("T")


class Client:
    """Blocking twin of AsyncClient (same arguments, same methods). Use `with Client(url) as c:`."""

    def __init__(self, redis_url: str | None = None, namespace: str = "headrace", **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="headrace-client")
        self._thread.daemon = True  # a forgotten close() must not hang interpreter exit
        self._thread.start()
        self._async = AsyncClient(redis_url, namespace, **kwargs)
        try:
            self._call(self._async.connect())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def redis_url(self) -> str | None:
        return self._async.redis_url

    @property
    def client_id(self) -> str:
        return self._async.client_id

    @property
    def reply_stream(self) -> str:
        return self._async.reply_stream

    @property
    def lost_jobs(self) -> int:
        """Jobs of this client that Redis lost (see AsyncClient)."""
        return self._async.lost_jobs

    def submit(self, prompt: str | None = None, **kwargs: Any) -> str:
        return self._call(self._async.submit(prompt, **kwargs))

    def submit_many(self, items: Iterable[Mapping[str, Any]]) -> list[str]:
        return self._call(self._async.submit_many(list(items)))

    def enqueue(
        self, items: Iterable[Mapping[str, Any]], *, resubmit: bool = False
    ) -> list[Submission]:
        return self._call(self._async.enqueue(list(items), resubmit=resubmit))

    def result(self, job_id: str, timeout: float | None = None) -> Result:
        return self._call(self._async.result(job_id, timeout))

    def fetch_result(self, job_id: str) -> Result | None:
        return self._call(self._async.fetch_result(job_id))

    def stream(self, job_id: str, timeout: float | None = None) -> Iterator[Result]:
        agen = self._async.stream(job_id, timeout)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(agen.aclose())

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Result:
        return self._call(self._async.generate(prompt, timeout=timeout, **kwargs))

    def cancel(self, job_id: str) -> None:
        self._call(self._async.cancel(job_id))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._async.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
