"""W8A8 engines pick greedy tokens through the int8 logit screen; nothing else changes.

In float32 the screen's argmax (of exact float32 logits) is the lm_head's, so a batch that
mixes plain greedy rows (screened) with rows that need full logits (logprobs, penalties,
min_tokens, sampling) must give the same tokens and logprobs with the screen on and off.
"""

from __future__ import annotations

import torch

from tests.markers import needs_packed_gemm
from worker.config import CacheConfig, EngineConfig, ModelConfig
from worker.engine.engine import Engine
from worker.engine.sequence import Request
from worker.params import SamplingParams

pytestmark = needs_packed_gemm


def _engine(model_dir, dtype: str, quantization: str) -> Engine:
    return Engine(
        EngineConfig(
            model=ModelConfig(source=str(model_dir), dtype=dtype, quantization=quantization),
            cache=CacheConfig(memory_gib=0.05, enable_prefix_caching=False),
        )
    )


_PARAMS = (
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3),
    SamplingParams(temperature=0.0, max_tokens=24, min_tokens=10, stop_token_ids=(5,)),
    SamplingParams(temperature=0.8, top_p=0.9, max_tokens=24, ignore_eos=True, seed=11),
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
)


def _run(engine: Engine, tag: str) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    requests = [
        Request(f"{tag}{i}", tuple(torch.randint(3, 4000, (n,), generator=gen).tolist()), p)
        for i, (n, p) in enumerate(zip((5, 37, 70, 12, 20, 3), _PARAMS, strict=True))
    ]
    out = []
    for c in engine.generate(requests):
        lps = None if c.logprobs is None else [(lp.token_id, lp.logprob) for lp in c.logprobs]
        out.append((c.token_ids, lps))
    return out


def test_w8a8_greedy_tokens_go_through_the_screen_unchanged(tiny_model_dir) -> None:
    engine = _engine(tiny_model_dir("qwen2"), "float32", "w8a8")
    model = engine.runner.model
    screen = model.logit_screen
    assert screen is not None
    screened: list[int] = []
    greedy_tokens = model.greedy_tokens

    def spy(hidden: torch.Tensor, vocab: int) -> torch.Tensor:
        screened.append(hidden.shape[0])
        return greedy_tokens(hidden, vocab)

    model.greedy_tokens = spy
    with_screen = _run(engine, "a")
    # Plain greedy rows only: the first and last requests, and the min_tokens one once it
    # has 10 tokens (until a stop token ends it).
    assert screened and max(screened) <= 3 and sum(screened) >= 2 * 23
    model.logit_screen = None
    without = _run(engine, "b")
    assert with_screen == without
    assert [len(t) for i, (t, _) in enumerate(with_screen) if i != 3] == [24] * 5


def test_only_w8a8_models_have_a_screen(tiny_model_dir) -> None:
    assert _engine(tiny_model_dir("llama"), "bfloat16", "none").runner.model.logit_screen is None
    w8a8 = _engine(tiny_model_dir("llama"), "bfloat16", "w8a8").runner.model
    assert w8a8.logit_screen is not None
    assert w8a8.logit_screen.weight.data_ptr() == w8a8.lm_head.weight.data_ptr()
