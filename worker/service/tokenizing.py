"""Tokenize stage: prompts → token ids in a thread pool, off the event loop, one call per batch.

Chat templates included. Each pool thread tokenizes on a private copy of the
tokenizer (a fast tokenizer must not be shared with the publish stage's decoding
across threads).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from worker.engine.prompts import encode_prompt
from worker.errors import RequestError
from worker.protocol import Job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tokenized:
    """Prompt token ids of one job, or why it cannot run."""

    token_ids: tuple[int, ...] = ()
    error: RequestError | None = None


class PromptEncoder:
    """Tokenizes jobs' prompts for one worker.

    Args:
        tokenizer: the engine's tokenizer (copied per pool thread).
        max_model_len: the engine's context length; longer prompts are refused.
        vocab_size: the model's vocabulary; prompt token ids and stop ids must be inside it.
        threads: pool threads.
    """

    def __init__(self, tokenizer: Any, *, max_model_len: int, vocab_size: int, threads: int = 1):
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="headrace-tokenize")
        self._local = threading.local()

    async def tokenize(self, jobs: Sequence[Job]) -> list[Tokenized]:
        """Prompt token ids for each job, computed in the thread pool in one batch."""
        if not jobs:
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._tokenize_batch, list(jobs))

    def _tokenize_batch(self, jobs: list[Job]) -> list[Tokenized]:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self._tokenizer)
        out = []
        for job in jobs:
            try:
                params = job.sampling_params()
                ids = encode_prompt(
                    tokenizer,
                    prompt=job.prompt,
                    messages=list(job.messages) if job.messages is not None else None,
                    prompt_token_ids=list(job.prompt_token_ids)
                    if job.prompt_token_ids is not None
                    else None,
                    max_model_len=self._max_model_len,
                    vocab_size=self._vocab_size,
                    special_tokens_in_content=params.special_tokens_in_content,
                )
                params.check_vocab(self._vocab_size)
                out.append(Tokenized(tuple(ids)))
            except RequestError as err:
                out.append(Tokenized(error=err))
            except Exception as exc:  # a tokenizer bug on one job must not fail the batch
                log.exception("tokenizing job %s failed", job.id)
                out.append(
                    Tokenized(error=RequestError("internal", f"tokenization failed: {exc!r}"))
                )
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
