"""Output stage: the one fold of a request's TokenOutputs into text, token ids, logprobs and stop.

Both drivers of the engine use it: `worker.engine.batch` (`Engine.generate`,
`headrace generate`) and the worker's publish stage (Redis results). Each keeps its
own thin rules on top (when to abort on a stop string, what the final result looks
like); the detokenizing, stop-string matching, token and logprob bookkeeping, and the
JSON form of logprobs live here only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from worker.engine.detokenizer import TextDelta, TextStream
from worker.engine.sequence import Completion, Request, TokenLogprobs, TokenOutput, Usage


class OutputAccumulator:
    """Everything one request has produced so far.

    Args:
        request: the request whose outputs are folded (its params: stop strings,
            min_tokens, skip_special_tokens, logprobs).
        tokenizer: the engine's tokenizer.
        incremental: detokenize as tokens arrive (needed for text deltas and stop
            strings); False → the text is decoded once at the end (the same text, cheaper).
    """

    def __init__(self, request: Request, tokenizer: Any, *, incremental: bool = True) -> None:
        self.request = request
        self._tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self._stream = (
            TextStream(tokenizer, request.prompt_token_ids, request.params) if incremental else None
        )
        self._flushed = False

    def add(self, out: TokenOutput) -> TextDelta:
        """Fold one step's output; the text now safe to show, and whether a stop string hit."""
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.logprobs)
        if self._stream is None:
            return TextDelta("")
        return self._stream.append(out.new_token_ids)

    @property
    def stopped(self) -> bool:
        """A stop string matched: the output has ended (the request should be aborted)."""
        return self._stream is not None and self._stream.stopped

    def flush(self) -> str:
        """Release the text held back (it could have begun a stop string), once; the
        sequence has ended. Returns that text ('' when not incremental, or flushed)."""
        if self._stream is None or self._flushed:
            return ""
        self._flushed = True
        return self._stream.finish()

    @property
    def text(self) -> str:
        """The final text (flushes what was held back first)."""
        if self._stream is not None:
            self.flush()
            return self._stream.text
        if not self.token_ids:
            return ""
        # No deltas and no stop strings: one decode at the end equals the incremental text.
        skip = self.request.params.skip_special_tokens
        return self._tokenizer.decode(self.token_ids, skip_special_tokens=skip)

    @property
    def usage(self) -> Usage:
        return Usage(len(self.request.prompt_token_ids), len(self.token_ids))

    def completion(self, finish_reason: str | None) -> Completion:
        """The request's Completion (`Engine.generate`): a stop string matched in the last
        step's text (or in the text flushed now) makes the finish reason "stop"."""
        text = self.text
        if self.stopped:
            finish_reason = "stop"
        params = self.request.params
        return Completion(
            request_id=self.request.request_id,
            text=text,
            token_ids=tuple(self.token_ids),
            finish_reason=finish_reason or "stop",
            usage=self.usage,
            logprobs=tuple(self.logprobs) if params.logprobs is not None else None,
        )


def logprobs_to_dicts(logprobs: Iterable[TokenLogprobs]) -> list[dict[str, Any]]:
    """Logprobs as JSON/msgpack-ready dicts: `{"token_id", "logprob", "top": [[id, logprob]...]}`
    (the form of a Redis result's `logprobs` and of `headrace generate`'s output lines)."""
    return [
        {
            "token_id": lp.token_id,
            "logprob": lp.logprob,
            "top": [[token_id, logprob] for token_id, logprob in lp.top],
        }
        for lp in logprobs
    ]
