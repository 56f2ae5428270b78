"""Incremental detokenization and stop strings (publish stage): token ids → safe text deltas.

The engine only produces token ids; the worker's CPU publish stage turns them into
text here and, when a stop string matches, aborts the request with reason "stop".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded ahead of the output, so that the first output tokens get the
# same space handling as in the middle of a text (vLLM and TGI use 5 as well).
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Token ids in, newly completed text out, re-decoding only a short window per call.

    The window runs from `prefix` (first token of the last emitted chunk) to the end:
    the text of the new tokens is decode(window) minus decode(window[:read]). Text
    ending in U+FFFD is held back: a byte-level token may carry part of a UTF-8
    character whose remaining bytes come with the next token.

    Invariant (byte-level BPE): "".join(add(...) results) + flush() equals
    tokenizer.decode(all output ids, skip_special_tokens=...).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt ending inside a character would glue its bytes to the output's.
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []
        self._window: list[int] = context
        self._read = len(context)
        self._prefix_text = self._decode(context)

    @property
    def window_len(self) -> int:
        """Tokens re-decoded by the next add(): the last chunk plus tokens held back."""
        return len(self._window)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append output token ids; return the text they complete (possibly "")."""
        if not token_ids:
            return ""
        self._window.extend(token_ids)
        text = self._decode(self._window)
        if text.endswith(REPLACEMENT_CHAR) or len(text) <= len(self._prefix_text):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """Release text held back at the end of the sequence (e.g. a truncated character)."""
        text = self._decode(self._window)
        if len(text) <= len(self._prefix_text):
            return ""
        return self._advance(text)

    def _advance(self, text: str) -> str:
        new_text = text[len(self._prefix_text) :]
        # The chunk just emitted becomes the next call's prefix (its context).
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return new_text

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)


@dataclass(frozen=True)
class TextDelta:
    """Text safe to send now; `stopped` once a stop string has ended the output."""

    text: str
    stopped: bool = False


class TextStream:
    """Detokenizer plus stop-string matcher for one sequence.

    Text that could still be the start of a stop string is held back, so a client
    never sees part of one. Among several stop strings the match that ends first in
    the text wins (ties: the one starting first), which is also the one a
    token-by-token stream meets first, so the result does not depend on how tokens
    are chunked. As in vLLM, stop strings only fire from the `min_tokens`-th token on.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
    ) -> None:
        self._detok = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens
        )
        self._stops = tuple(params.stop)
        self._partial = _PartialStops(self._stops)
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._num_tokens = 0
        self._full = ""  # everything detokenized so far, emitted or not
        self._emitted = 0  # length of the prefix of _full returned to the caller
        self._floor = 0  # stop matches must end after this offset (min_tokens)
        self._stop_str: str | None = None
        self._done = False

    @property
    def text(self) -> str:
        """All text returned so far; the final output once stopped or finished."""
        return self._full[: self._emitted]

    @property
    def stopped(self) -> bool:
        """A stop string matched; the caller should abort the request with reason "stop"."""
        return self._stop_str is not None

    @property
    def stop_str(self) -> str | None:
        """The stop string that ended the output, if any."""
        return self._stop_str

    def append(self, token_ids: Sequence[int]) -> TextDelta:
        """Feed new output token ids; after a stop or finish() this returns empty text."""
        if self._done or not token_ids:
            return TextDelta("", self.stopped)
        start = len(self._full)
        head = max(0, min(len(token_ids), self._min_tokens - 1 - self._num_tokens))
        if head:
            self._full += self._detok.add(token_ids[:head])
            self._floor = len(self._full)
        self._full += self._detok.add(token_ids[head:])
        self._num_tokens += len(token_ids)
        return TextDelta(self._release(start, final=False), self.stopped)

    def finish(self) -> str:
        """End the sequence (EOS, length, abort): release all held-back text."""
        if self._done:
            return ""
        start = len(self._full)
        self._full += self._detok.flush()
        return self._release(start, final=True)

    def _release(self, start: int, *, final: bool) -> str:
        """Emit what is safe of _full, given that the text from `start` on is new."""
        match = self._find_stop(max(start, self._floor))
        if match is not None:
            index, stop = match
            self._stop_str = stop
            self._done = True
            end = index + len(stop) if self._include_stop else index
        else:
            self._done = final
            end = len(self._full) if final else len(self._full) - self._partial.feed(self._full)
        end = max(end, self._emitted)
        delta = self._full[self._emitted : end]
        self._emitted = end
        if self._done:
            self._full = self._full[:end]
        return delta

    def _find_stop(self, lo: int) -> tuple[int, str] | None:
        """(start, stop string) of the match ending first after offset `lo`, if any."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            index = self._full.find(stop, max(0, lo - len(stop) + 1))
            if index < 0:
                continue
            candidate = (index + len(stop), index, stop)
            if best is None or candidate < best:
                best = candidate
        return None if best is None else (best[1], best[2])


class _PartialStops:
    """The longest tail of a growing text that is a proper prefix of a stop string.

    One KMP automaton per stop string, fed each character once: linear in the text, where
    testing every prefix of every stop after each token was quadratic (16 stops of 60k
    characters over 3,000 tokens took minutes of the event loop's time).
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._fail = [_prefix_function(stop) for stop in stops]
        self._state = [0] * len(stops)  # matched prefix length of each stop
        self._fed = 0  # characters of the text fed so far

    def feed(self, text: str) -> int:
        """Feed text[fed:] (text only grows between calls) → the held-back length."""
        new = text[self._fed :]
        self._fed = len(text)
        longest = 0
        for i, (stop, fail) in enumerate(zip(self._stops, self._fail, strict=True)):
            k = self._state[i]
            for ch in new:
                while k and stop[k] != ch:
                    k = fail[k - 1]
                if stop[k] == ch:
                    k += 1
                if k == len(stop):  # a whole match: keep only its proper borders
                    k = fail[k - 1]
            self._state[i] = k
            longest = max(longest, k)
        return longest


def _prefix_function(s: str) -> list[int]:
    """pi[i]: length of the longest proper prefix of s[: i + 1] that is also its suffix."""
    pi = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = pi[k - 1]
        if s[i] == s[k]:
            k += 1
        pi[i] = k
    return pi
