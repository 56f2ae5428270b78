"""The one fold of token outputs (worker.engine.output), shared by generate and the worker."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from worker.engine import OutputAccumulator, Request, SamplingParams, TokenOutput
from worker.engine.output import logprobs_to_dicts
from worker.engine.sequence import TokenLogprobs


@pytest.fixture(scope="module")
def tok(smollm2_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir)


def _request(tok: PreTrainedTokenizerBase, **params: object) -> Request:
    prompt = tuple(tok("The river", add_special_tokens=False).input_ids)
    return Request("r", prompt, SamplingParams.from_dict(params))


def _outputs(tok: PreTrainedTokenizerBase, text: str) -> list[TokenOutput]:
    ids = tok(text, add_special_tokens=False).input_ids
    outs = [TokenOutput("r", (i,)) for i in ids[:-1]]
    return [*outs, TokenOutput("r", (ids[-1],), "length")]


def test_one_decode_at_the_end_equals_the_incremental_text(tok) -> None:
    text = " runs to the sea, 海 and back — twice."
    incremental = OutputAccumulator(_request(tok), tok)
    at_end = OutputAccumulator(_request(tok), tok, incremental=False)
    shown = "".join(incremental.add(out).text for out in _outputs(tok, text))
    for out in _outputs(tok, text):
        at_end.add(out)
    shown += incremental.flush()
    assert shown == incremental.text == at_end.text == text
    assert incremental.token_ids == at_end.token_ids


def test_a_stop_string_ends_the_text_and_makes_the_finish_reason_stop(tok) -> None:
    output = OutputAccumulator(_request(tok, stop=["sea"]), tok)
    stopped = [output.add(out).stopped for out in _outputs(tok, " runs to the sea and back")]
    assert any(stopped) and output.stopped
    completion = output.completion("length")
    assert (completion.text, completion.finish_reason) == (" runs to the ", "stop")
    assert completion.logprobs is None  # not asked


def test_logprobs_are_folded_and_serialised_once(tok) -> None:
    output = OutputAccumulator(_request(tok, logprobs=1), tok)
    lp = TokenLogprobs(5, -0.25, ((5, -0.25), (7, -1.5)))
    output.add(TokenOutput("r", (5,), "length", logprobs=(lp,)))
    assert output.completion("length").logprobs == (lp,)
    assert logprobs_to_dicts(output.logprobs) == [
        {"token_id": 5, "logprob": -0.25, "top": [[5, -0.25], [7, -1.5]]}
    ]
