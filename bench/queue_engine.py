"""Test engine (`headrace bench queue` only): answers every request with a fixed number of tokens at once.

NOT an inference engine: it never runs a model. It stands in for `Engine` behind a real
`WorkerService`, so that a benchmark of the queue layer (producer → Redis → worker →
result) measures Redis and the service, not generation. Its outputs are named as
such in the benchmark's report. Nothing but `bench/queue.py` may use it.

Run as `python -m bench.queue_engine URL CONSUMER TOKENS` it is one worker process.
"""

from __future__ import annotations

import sys
from typing import Any

from worker.engine.engine import EngineStats
from worker.engine.sequence import Request, TokenOutput

TEST_ENGINE_NAME = "FixedTokensTestEngine (test engine: no model, fixed tokens at once)"


class FixedTokensTestEngine:
    """Each step finishes every request added since the last one with `num_tokens` tokens.

    Args:
        tokenizer: a real tokenizer (the worker validates prompts and detokenizes with it).
        num_tokens: output tokens per request (finish reason "length").
        token_id: the token repeated.
    """

    def __init__(self, tokenizer: Any, num_tokens: int, token_id: int = 260) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.max_model_len = 4096
        self._num_tokens = num_tokens
        self._token_id = token_id
        self._waiting: dict[str, Request] = {}
        self._aborted: dict[str, str] = {}

    def add_request(self, request: Request) -> None:
        self._waiting[request.request_id] = request

    def abort_request(self, request_id: str, reason: str = "abort") -> None:
        if self._waiting.pop(request_id, None) is not None:
            self._aborted[request_id] = reason

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._aborted)

    def step(self) -> list[TokenOutput]:
        outputs = [TokenOutput(rid, (), reason) for rid, reason in self._aborted.items()] + [
            TokenOutput(
                rid,
                (self._token_id,) * self._num_tokens,
                "length",
                num_prompt_tokens=len(req.prompt_token_ids),
            )
            for rid, req in self._waiting.items()
        ]
        self._waiting, self._aborted = {}, {}
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(len(self._waiting), 0, 0, 0, 16, 0, 0)


def main(argv: list[str]) -> int:
    """One worker process with the test engine: URL CONSUMER TOKENS."""
    from transformers import AutoTokenizer

    from worker.config import DEFAULT_MODEL
    from worker.models.source import resolve_model
    from worker.service.run import run_event_loop
    from worker.service.settings import WorkerConfig
    from worker.service.worker import WorkerService

    url, consumer, tokens = argv[0], argv[1], int(argv[2])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    engine = FixedTokensTestEngine(tokenizer, tokens)
    config = WorkerConfig(redis_url=url, consumer=consumer, max_inflight=64, read_block_ms=500)
    return run_event_loop(WorkerService(config, engine).run())  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
