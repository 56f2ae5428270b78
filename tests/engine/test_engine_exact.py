"""Greedy outputs are token-identical to transformers' `generate` in float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.prompts_data import PROMPTS
from tests.tiny_models import ARCHS
from worker.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from worker.engine.engine import Engine
from worker.engine.sequence import Request
from worker.params import SamplingParams


def _hf_greedy(
    model_dir: Path, prompts: list[list[int]], max_new: int, stop_at_eos: bool
) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for ids in prompts:
        kwargs = {} if stop_at_eos else {"eos_token_id": None}
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=0,
                **kwargs,
            )
        outs.append(out[0, len(ids) :].tolist())
    return outs


def _engine(model_dir: Path, **sched: int) -> Engine:
    return Engine(
        EngineConfig(
            model=ModelConfig(source=str(model_dir), dtype="float32"),
            cache=CacheConfig(memory_gib=0.25),
            scheduler=SchedulerConfig(**sched) if sched else SchedulerConfig(),
        )
    )


def _ours(
    engine: Engine, prompts: list[list[int]], max_new: int, ignore_eos: bool
) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=ignore_eos)
    requests = [Request(str(i), tuple(ids), params) for i, ids in enumerate(prompts)]
    return [list(c.token_ids) for c in engine.generate(requests)]


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_match_transformers(arch: str, tiny_model_dir) -> None:
    model_dir = tiny_model_dir(arch)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    expected = _hf_greedy(model_dir, prompts, max_new=24, stop_at_eos=False)
    assert _ours(_engine(model_dir), prompts, 24, ignore_eos=True) == expected


@pytest.mark.slow
def test_smollm2_chat_matches_transformers(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in PROMPTS
    ]
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    expected = _hf_greedy(smollm2_dir, ids, max_new=32, stop_at_eos=True)
    got = _ours(_engine(smollm2_dir), ids, 32, ignore_eos=False)
    assert got == expected
    assert any(len(e) < 32 for e in expected), "some answers should end with EOS"


@pytest.mark.slow
def test_smollm2_bfloat16_agrees_with_transformers_bfloat16(smollm2_dir: Path) -> None:
    """The bf16 path (packed GEMMs: AMX or oneDNN where the CPU has them, the C++ row kernels)
    scores text like transformers in bf16. Not token-exact: both round in bf16, in other
    orders. A wrong layout or a transposed tile gives near-zero agreement."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokens = tokenizer.encode(" ".join(PROMPTS) * 3)[:160]
    engine = Engine(
        EngineConfig(
            model=ModelConfig(source=str(smollm2_dir), dtype="bfloat16"),
            cache=CacheConfig(memory_gib=0.05),
        )
    )
    ours = engine.score(tokens, chunk_size=32)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([tokens])).logits[0].float()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert top1 >= 0.95, top1
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel < 0.05, rel
