"""Sampler: greedy, temperature, filters, penalties, min_tokens, per-request seeds, logprobs.

Distributions are checked against a hand-written per-row reference over a small
vocabulary with a chi-square bound; every sampler is seeded, so each check is
deterministic.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from ops.sampling import invert_cdf
from worker.engine.sampler import Sampler, apply_penalties
from worker.engine.sequence import Request, Sequence
from worker.params import SamplingParams

EOS = frozenset({0})


def make_seq(
    params: SamplingParams, prompt: tuple[int, ...] = (1, 2), output: tuple[int, ...] = ()
) -> Sequence:
    seq = Sequence(Request("r", prompt, params))
    seq.output_token_ids = list(output)
    return seq


def short_id(p: SamplingParams) -> str:
    """Test id: the fields that differ from the defaults."""
    default = SamplingParams()
    return ",".join(
        f"{f.name}={getattr(p, f.name)}"
        for f in dataclasses.fields(p)
        if getattr(p, f.name) != getattr(default, f.name)
    )


def chi_square(counts: list[int], probs: list[float]) -> float:
    """Pearson's statistic; a token with zero expected probability must never be drawn."""
    n = sum(counts)
    stat = 0.0
    for c, p in zip(counts, probs, strict=True):
        if p == 0.0:
            assert c == 0, "sampled a token whose probability is zero"
        else:
            stat += (c - n * p) ** 2 / (n * p)
    return stat


def assert_matches(counts: list[int], probs: list[float]) -> None:
    df = sum(p > 0 for p in probs) - 1
    # ~p = 0.001 for the degrees of freedom used here; a wrong distribution scores in the hundreds.
    bound = df + 5 * math.sqrt(2 * max(df, 1))
    assert chi_square(counts, probs) < bound, (counts, probs)


def reference_penalized(
    logits: list[float], p: SamplingParams, prompt: tuple[int, ...], output: tuple[int, ...]
) -> list[float]:
    out = list(logits)
    if p.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            r = p.repetition_penalty
            out[t] = out[t] / r if out[t] > 0 else out[t] * r
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    if len(output) < p.min_tokens:
        for t in (set() if p.ignore_eos else set(EOS)) | set(p.stop_token_ids):
            out[t] = -math.inf
    return out


def reference_probs(
    logits: list[float],
    p: SamplingParams,
    prompt: tuple[int, ...] = (1, 2),
    output: tuple[int, ...] = (),
) -> list[float]:
    """penalties → temperature → min_p → top_k → top_p (vLLM v1 order), one row, plain Python."""
    scaled = [v / p.temperature for v in reference_penalized(logits, p, prompt, output)]
    top = max(scaled)
    weights = [math.exp(v - top) for v in scaled]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = [w >= p.min_p for w in weights]
    if p.top_k > 0:
        for i in order[p.top_k :]:
            keep[i] = False
    if p.top_p < 1.0:
        mass = sum(w for w, k in zip(weights, keep, strict=True) if k)
        cum = 0.0
        for i in order:
            if cum >= p.top_p * mass:
                keep[i] = False
            elif keep[i]:
                cum += weights[i]
    kept = [w if k else 0.0 for w, k in zip(weights, keep, strict=True)]
    return [w / sum(kept) for w in kept]


def draw_counts(sampler: Sampler, logits: list[float], seq: Sequence, n: int) -> list[int]:
    """Sample n rows sharing one logit row and one sequence state; count each token."""
    row = torch.tensor(logits, dtype=torch.float32)
    out = sampler(row.expand(n, -1).contiguous(), [seq] * n, EOS)
    return torch.bincount(torch.tensor(out.token_ids), minlength=len(logits)).tolist()


def test_greedy_is_argmax() -> None:
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(1))
    out = Sampler(300)(logits, [make_seq(SamplingParams(temperature=0.0))] * 16, EOS)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 16


@pytest.mark.parametrize("vocab", [50, 3000])
def test_top_k_one_and_tiny_top_p_are_greedy_at_any_temperature(vocab: int) -> None:
    logits = torch.randn(40, vocab, generator=torch.Generator().manual_seed(2)) * 2
    temps = [0.05, 0.5, 1.0, 3.0, 20.0]
    params = [SamplingParams(temperature=t, top_k=1) for t in temps]
    params += [SamplingParams(temperature=t, top_p=1e-6) for t in temps]
    seqs = [make_seq(params[i % len(params)]) for i in range(40)]
    out = Sampler(vocab, seed=3)(logits, seqs, EOS)
    assert out.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_matches_softmax(temperature: float) -> None:
    logits = [2.0, 1.0, 0.5, 0.0, -1.0]
    seq = make_seq(SamplingParams(temperature=temperature))
    counts = draw_counts(Sampler(5, seed=4), logits, seq, 20000)
    expected = torch.softmax(torch.tensor(logits) / temperature, -1).tolist()
    assert_matches(counts, expected)
    # The bound is tight enough to tell neighbouring temperatures apart.
    wrong = torch.softmax(torch.tensor(logits) / (temperature * 1.3), -1).tolist()
    assert chi_square(counts, wrong) > 50


def test_min_p_keeps_only_tokens_near_the_top() -> None:
    logits = [3.0, 2.5, 2.0, 1.0, 0.0, -2.0, 2.9, -1.0]
    params = SamplingParams(temperature=1.0, min_p=0.3)
    counts = draw_counts(Sampler(8, seed=5), logits, make_seq(params), 8000)
    probs = torch.softmax(torch.tensor(logits), -1)
    allowed = (probs >= 0.3 * probs.max()).tolist()
    assert all(c == 0 for c, ok in zip(counts, allowed, strict=True) if not ok)
    assert sum(1 for c in counts if c) == sum(allowed) == 4
    assert_matches(counts, reference_probs(logits, params))


FILTER_CASES = [
    SamplingParams(temperature=0.8, top_k=3),
    SamplingParams(temperature=1.3, top_p=0.7),
    SamplingParams(temperature=1.0, top_k=5, top_p=0.8),
    SamplingParams(temperature=0.7, min_p=0.1, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.05, top_k=4, top_p=0.95),
]


@pytest.mark.parametrize("params", FILTER_CASES, ids=short_id)
def test_filters_match_reference(params: SamplingParams) -> None:
    logits = [1.5, -0.5, 2.2, 0.3, 1.9, -2.0, 0.8, 1.1]
    counts = draw_counts(Sampler(8, seed=6), logits, make_seq(params), 8000)
    assert_matches(counts, reference_probs(logits, params))


PENALTY_CASES = [
    SamplingParams(temperature=1.0, repetition_penalty=1.8),
    SamplingParams(temperature=1.0, repetition_penalty=0.6),
    SamplingParams(temperature=1.0, presence_penalty=1.5),
    SamplingParams(temperature=1.0, frequency_penalty=0.7),
    SamplingParams(temperature=1.0, frequency_penalty=-0.5, presence_penalty=-1.0),
    SamplingParams(
        temperature=0.9, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3
    ),
]
PROMPT = (1, 2, 2)
OUTPUT = (3, 5, 5, 5, 2)


@pytest.mark.parametrize("params", PENALTY_CASES, ids=short_id)
def test_penalties_match_reference(params: SamplingParams) -> None:
    logits = [0.4, 1.2, -0.7, 0.9, 0.1, 1.6, -1.2, 0.5]
    seq = make_seq(params, PROMPT, OUTPUT)
    got = apply_penalties(torch.tensor([logits]), [seq], EOS)[0].tolist()
    want = reference_penalized(logits, params, PROMPT, OUTPUT)
    assert got == pytest.approx(want, abs=1e-6)
    assert got != pytest.approx(logits, abs=1e-3)
    counts = draw_counts(Sampler(8, seed=7), logits, seq, 8000)
    assert_matches(counts, reference_probs(logits, params, PROMPT, OUTPUT))


def test_penalties_are_per_row_and_leave_input_untouched() -> None:
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(8))
    before = logits.clone()
    seqs = [
        make_seq(SamplingParams(), PROMPT, OUTPUT),
        make_seq(SamplingParams(repetition_penalty=2.0), PROMPT, OUTPUT),
        make_seq(SamplingParams(frequency_penalty=1.0), (4,), (4, 4, 6)),
    ]
    got = apply_penalties(logits, seqs, EOS)
    assert torch.equal(logits, before)
    for row, seq in enumerate(seqs):
        prompt, output = tuple(seq.prompt_token_ids), tuple(seq.output_token_ids)
        want = reference_penalized(logits[row].tolist(), seq.params, prompt, output)
        assert got[row].tolist() == pytest.approx(want, abs=1e-6)
    assert apply_penalties(logits, seqs[:1], EOS) is logits


def test_min_tokens_masks_eos_and_stop_tokens() -> None:
    logits = torch.tensor([[9.0, 0.0, 8.0, 1.0, 0.5]])
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(2,))
    sampler = Sampler(5)
    assert sampler(logits, [make_seq(params, output=(4,))], EOS).token_ids == [3]
    assert sampler(logits, [make_seq(params, output=(4, 4, 4))], EOS).token_ids == [0]
    ignore = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)
    assert sampler(logits, [make_seq(ignore, output=(4,))], EOS).token_ids == [0]
    # Sampled rows never draw a masked token either, even at high temperature.
    hot = SamplingParams(temperature=5.0, min_tokens=2, stop_token_ids=(2,))
    counts = draw_counts(Sampler(5, seed=9), logits[0].tolist(), make_seq(hot), 4000)
    assert counts[0] == counts[2] == 0
    assert min(counts[1], counts[3], counts[4]) > 0


def seeded_tokens(
    sampler: Sampler,
    row: torch.Tensor,
    params: SamplingParams,
    where: int,
    others: list[SamplingParams],
) -> list[int]:
    """Tokens of a seeded row over 12 steps, placed at `where` among `others` (params list)."""
    vocab = row.shape[0]
    other_logits = torch.randn(len(others), vocab, generator=torch.Generator().manual_seed(10))
    tokens = []
    for step in range(12):
        seqs = [make_seq(p, output=tuple(range(step % 3))) for p in others]
        seqs.insert(where, make_seq(params, output=(7,) * step))
        logits = torch.cat([other_logits[:where], row[None], other_logits[where:]])
        tokens.append(sampler(logits, seqs, EOS).token_ids[where])
    return tokens


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=42),
        SamplingParams(temperature=0.8, top_p=0.9, seed=42),
        SamplingParams(temperature=1.2, top_k=30, min_p=0.02, seed=42),
    ],
    ids=short_id,
)
def test_seeded_row_is_independent_of_batch_and_position(params: SamplingParams) -> None:
    vocab = 1500
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(11)) * 2
    alone = seeded_tokens(Sampler(vocab, seed=0), row, params, 0, [])
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_k=1200),
        SamplingParams(temperature=2.0, top_p=0.99, repetition_penalty=1.2),
        SamplingParams(temperature=0.7, seed=7, logprobs=2),
    ]
    for where in (0, 2, 5):
        busy = seeded_tokens(Sampler(vocab, seed=where + 1), row, params, where, others)
        assert busy == alone
    assert len(set(alone)) > 3  # the row really samples, it is not stuck on one token
    other_seed = seeded_tokens(Sampler(vocab), row, dataclasses.replace(params, seed=43), 0, [])
    assert other_seed != alone


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = torch.zeros(64, 100)
    seqs = [make_seq(SamplingParams())] * 64
    a, b, c = (Sampler(100, seed=s)(logits, seqs, EOS).token_ids for s in (1, 1, 2))
    assert a == b
    assert a != c


def test_candidate_ladder_reaches_large_nuclei() -> None:
    """A flat row's nucleus is larger than the first candidate sets; it must still be exact."""
    vocab = 2500
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(12)) * 0.3
    for params in (SamplingParams(top_p=0.9), SamplingParams(min_p=0.2)):
        probs = torch.tensor(reference_probs(row.tolist(), params))
        out = Sampler(vocab, seed=13)(row.expand(500, -1), [make_seq(params)] * 500, EOS)
        drawn = torch.tensor(out.token_ids)
        assert bool((probs[drawn] > 0).all())
        rank = torch.argsort(row, descending=True).argsort()
        assert int(rank[drawn].max()) > 1024
        assert int((probs > 0).sum()) > 1024


def test_logprobs_are_raw_log_softmax() -> None:
    vocab = 200
    logits = torch.randn(4, vocab + 56, generator=torch.Generator().manual_seed(14)) * 3
    logits[:, vocab:] = 50.0  # padded lm_head columns
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.5, logprobs=5),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, logprobs=0),
    ]
    seqs = [make_seq(p, output=(1, 2, 3)) for p in params]
    out = Sampler(vocab, seed=15)(logits, seqs, EOS)
    want = torch.log_softmax(logits[:, :vocab], -1)
    assert out.logprobs[2] is None
    for row in (0, 1, 3):
        lp = out.logprobs[row]
        assert lp is not None and lp.token_id == out.token_ids[row]
        assert lp.logprob == pytest.approx(want[row, lp.token_id].item(), abs=1e-5)
        n = params[row].logprobs
        top_v, top_i = want[row].topk(n) if n else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in lp.top] == top_i.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_v.tolist(), abs=1e-5)
    assert out.token_ids[0] == want[0].argmax().item()


def test_padded_vocab_columns_are_never_sampled() -> None:
    vocab = 64
    logits = torch.randn(5, vocab + 64, generator=torch.Generator().manual_seed(16))
    logits[:, vocab:] = 1e4
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=50.0, top_p=0.999),
        SamplingParams(temperature=3.0, top_k=60, min_p=0.01),
        SamplingParams(temperature=100.0, seed=1, presence_penalty=1.0),
    ]
    seqs = [make_seq(params[i % 5], output=(vocab + 3, 1)) for i in range(500)]
    out = Sampler(vocab, seed=17)(logits.repeat(100, 1), seqs, EOS)
    assert max(out.token_ids) < vocab
    assert len(set(out.token_ids)) > vocab // 2


def test_cdf_inversion_never_runs_past_the_kept_mass() -> None:
    """A uniform of exactly 1.0 (which some RNG backends can return) must stay in the kept set."""
    # Kept set: the first 3 entries (total mass 3); entries 3-4 carry no mass, 5 is filtered out.
    cdf = torch.tensor([[1.0, 2.0, 3.0, 3.0, 3.0, 4.0]])
    total = torch.tensor([3.0])
    assert invert_cdf(cdf, torch.tensor([1.0]), total).tolist() == [2]
    assert invert_cdf(cdf, torch.tensor([1.0 - 2.0**-24]), total).tolist() == [2]
    assert invert_cdf(cdf, torch.tensor([0.5]), total).tolist() == [1]
    assert invert_cdf(cdf, torch.tensor([0.0]), total).tolist() == [0]
