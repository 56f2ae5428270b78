"""Incremental detokenization and stop strings against SmolLM2's real byte-level BPE tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from worker.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, TextStream
from worker.params import SamplingParams

MULTILINGUAL = (
    "Hello world, naïve café façade — déjà vu. 你好，世界！我们今天去公园散步吧。"
    "Emoji: 😀👍🏽🇫🇷👨‍👩‍👧 ✓ ∑ ≠ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢. Ελληνικά, русский, العربية, हिन्दी.\n"
    "def f(x: int) -> int:\n    return {'k': x ** 2}  # comment\n\tif a != b: pass\n"
)
SPECIAL_IDS = (0, 1, 2)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def pool(tok: PreTrainedTokenizerBase) -> list[int]:
    ids = tok.encode(MULTILINGUAL)
    # Many tokens here carry partial UTF-8 characters, the case the detokenizer must hold.
    assert any(REPLACEMENT_CHAR in tok.decode([t]) for t in ids)
    return ids


@st.composite
def token_runs(draw: st.DrawFn, pool: list[int]) -> list[int]:
    """Either a contiguous slice of real text (may start mid-character) or shuffled ids."""
    if draw(st.booleans()):
        start = draw(st.integers(0, len(pool) - 1))
        return pool[start : start + draw(st.integers(0, 40))]
    ids = st.one_of(st.sampled_from(pool), st.sampled_from(SPECIAL_IDS))
    return draw(st.lists(ids, max_size=40))


def chunked(draw: st.DrawFn, ids: Sequence[int]) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        n = draw(st.integers(1, 5))
        chunks.append(list(ids[i : i + n]))
        i += n
    return chunks


@SETTINGS
@given(data=st.data())
def test_deltas_concatenate_to_full_decode(
    tok: PreTrainedTokenizerBase, pool: list[int], data: st.DataObject
) -> None:
    prompt = data.draw(token_runs(pool), label="prompt")
    output = data.draw(token_runs(pool), label="output")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = [detok.add(chunk) for chunk in chunked(data.draw, output)]
    deltas.append(detok.flush())
    full = tok.decode(output, skip_special_tokens=skip)
    assert "".join(deltas) == full
    if REPLACEMENT_CHAR not in full:
        assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_never_emits_half_a_character(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1, "the emoji must span several byte-level tokens for this test"
    detok = IncrementalDetokenizer(tok, tok.encode("Look:"))
    assert [detok.add([t]) for t in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_truncated_character_is_released_by_flush(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode("ok 😀")[:-1]
    detok = IncrementalDetokenizer(tok, [])
    text = "".join(detok.add([t]) for t in ids)
    assert REPLACEMENT_CHAR not in text
    assert text + detok.flush() == tok.decode(ids)
    assert tok.decode(ids).endswith(REPLACEMENT_CHAR)


def test_first_tokens_keep_their_leading_space(tok: PreTrainedTokenizerBase) -> None:
    prompt, output = tok.encode("The answer is"), tok.encode(" forty two")
    detok = IncrementalDetokenizer(tok, prompt)
    text = "".join(detok.add([t]) for t in output)
    assert text == " forty two"
    assert text == tok.decode(prompt + output)[len(tok.decode(prompt)) :]


def test_special_tokens_follow_skip_flag(tok: PreTrainedTokenizerBase) -> None:
    output = [*tok.encode("Hi"), 2]
    for skip, expected in ((True, "Hi"), (False, "Hi<|im_end|>")):
        detok = IncrementalDetokenizer(tok, [1], skip_special_tokens=skip)
        assert "".join(detok.add([t]) for t in output) + detok.flush() == expected


def test_work_per_call_is_bounded(tok: PreTrainedTokenizerBase, pool: list[int]) -> None:
    output = pool * 8
    detok = IncrementalDetokenizer(tok, pool)
    windows = []
    for t in output:
        detok.add([t])
        windows.append(detok.window_len)
    assert max(windows) <= 12, "the re-decoded window must not grow with the output"


def stream_all(
    tok: PreTrainedTokenizerBase, ids: Sequence[int], chunks: list[list[int]], **params: object
) -> tuple[TextStream, list[str], list[bool]]:
    stream = TextStream(tok, [], SamplingParams(**params))
    texts, stops = [], []
    for chunk in chunks:
        delta = stream.append(chunk)
        texts.append(delta.text)
        stops.append(delta.stopped)
    texts.append(stream.finish())
    return stream, texts, stops


SENTENCE = "Hello world, stop here please"


def test_stop_string_across_token_boundaries(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode(SENTENCE)
    pieces = [tok.decode([t]) for t in ids]
    assert not any("op he" in p for p in pieces), "stop must span several tokens"
    completes_at = next(i for i in range(len(ids)) if "op he" in tok.decode(ids[: i + 1]))
    for include, expected in ((False, "Hello world, st"), (True, "Hello world, stop he")):
        stream, texts, stops = stream_all(
            tok, ids, [[t] for t in ids], stop=["op he"], include_stop_str_in_output=include
        )
        assert "".join(texts) == stream.text == expected
        assert stops == [i >= completes_at for i in range(len(ids))]
        assert stream.stopped and stream.stop_str == "op he"
        assert all(t == "" for t in texts[completes_at + 1 :])


def test_partial_stop_string_never_leaks(tok: PreTrainedTokenizerBase) -> None:
    stop = "op here!"  # the text only ever holds "op here": the stop never fires
    ids = tok.encode("Hello world, stop here")
    stream = TextStream(tok, [], SamplingParams(stop=[stop]))
    emitted = ""
    for t in ids:
        delta = stream.append([t])
        emitted += delta.text
        assert not delta.stopped
        assert not any(emitted.endswith(stop[:k]) for k in range(1, len(stop)))
        assert emitted == stream.text
    assert emitted == "Hello world, st"
    assert stream.finish() == "op here"
    assert stream.text == "Hello world, stop here" and not stream.stopped


@pytest.mark.parametrize(
    ("stops", "include", "expected"),
    [
        (["please", "world"], False, "Hello "),
        (["please", "world"], True, "Hello world"),
        # "ld" ends before "world, stop" does, so a token-by-token stream meets it first.
        (["world, stop", "ld"], False, "Hello wor"),
        # Same end: the match that starts first wins.
        (["op", "stop"], False, "Hello world, "),
        (["op", "stop"], True, "Hello world, stop"),
    ],
)
def test_earliest_stop_wins(
    tok: PreTrainedTokenizerBase, stops: list[str], include: bool, expected: str
) -> None:
    ids = tok.encode(SENTENCE)
    for chunks in ([[t] for t in ids], [ids]):
        stream, texts, _ = stream_all(
            tok, ids, chunks, stop=stops, include_stop_str_in_output=include
        )
        assert "".join(texts) == stream.text == expected


def test_stop_strings_wait_for_min_tokens(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode("stop a stop b")
    assert tok.decode(ids[:1]) == "stop", "the first 'stop' must be the first token"
    for chunks in ([[t] for t in ids], [ids]):
        stream, texts, _ = stream_all(tok, ids, chunks, stop=["stop"], min_tokens=2)
        assert "".join(texts) == stream.text == "stop a "


def test_finish_releases_held_text(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode("Hello wor")
    stream, texts, stops = stream_all(tok, ids, [[t] for t in ids], stop=["world peace"])
    assert "".join(texts[:-1]) == "Hello "
    assert texts[-1] == "wor" and not any(stops)
    assert stream.text == "Hello wor"
    assert stream.append(tok.encode("ld")).text == ""


@SETTINGS
@given(data=st.data())
def test_stream_matches_reference_for_any_chunking(
    tok: PreTrainedTokenizerBase, pool: list[int], data: st.DataObject
) -> None:
    output = data.draw(token_runs(pool), label="output")
    full = tok.decode(output, skip_special_tokens=True)
    candidates = [full[i : i + n] for i in range(len(full)) for n in (1, 2, 4)]
    candidates = [c for c in candidates if c and REPLACEMENT_CHAR not in c] or ["zz"]
    stops = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3), label="stops")
    include = data.draw(st.booleans(), label="include")
    stream = TextStream(tok, [], SamplingParams(stop=stops, include_stop_str_in_output=include))
    expected = reference_stop(full, stops, include)
    emitted = ""
    for chunk in chunked(data.draw, output):
        emitted += stream.append(chunk).text
        # Whatever the tokens still to come, nothing sent so far is ever taken back.
        assert expected.startswith(emitted)
    emitted += stream.finish()
    assert emitted == stream.text == expected


def reference_stop(text: str, stops: list[str], include: bool) -> str:
    """Scan the finished text end by end: the first stop string to complete wins."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            stop = max(hits, key=len)
            return text[:end] if include else text[: end - len(stop)]
    return text


@settings(max_examples=300, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=6), min_size=1, max_size=3),
    pieces=st.lists(st.text(alphabet="abc", max_size=5), max_size=12),
)
def test_held_back_tail_is_the_longest_proper_stop_prefix(
    stops: list[str], pieces: list[str]
) -> None:
    from worker.engine.detokenizer import _PartialStops

    partial, text = _PartialStops(tuple(stops)), ""
    for piece in pieces:
        text += piece
        # By definition, checked the slow way: every proper prefix of every stop string.
        expected = max(
            (k for stop in stops for k in range(len(stop)) if k and text.endswith(stop[:k])),
            default=0,
        )
        assert partial.feed(text) == expected
