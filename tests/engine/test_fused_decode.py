"""The decode-only steps' C++ layer loop (`ops.decode_layers`) against the Python layer loop.

The loop calls the same kernels with the same inputs, so everything must agree bit for bit:
greedy tokens and the logprobs of every step, for each architecture (qkv bias, Qwen3's
q/k norms, GQA shapes), in bf16 and in W8A8 with an int8 KV cache. It must also step aside
whenever it would not compute what the modules compute: hooks, swapped modules, edited
weights.
"""

from __future__ import annotations

import pytest
import torch

from tests.markers import needs_packed_gemm
from tests.tiny_models import ARCHS
from worker.config import CacheConfig, EngineConfig, ModelConfig
from worker.engine.engine import Engine
from worker.engine.sequence import Request
from worker.params import SamplingParams

pytestmark = needs_packed_gemm


def _engine(model_dir, quantization: str = "none", kv: str = "auto") -> Engine:
    return Engine(
        EngineConfig(
            model=ModelConfig(source=str(model_dir), dtype="bfloat16", quantization=quantization),
            # No prefix caching: the second run's prefills must be the first's (with int8 K/V a
            # cache hit reads its prefix quantized, which a one-chunk prefill does not).
            cache=CacheConfig(memory_gib=0.05, dtype=kv, enable_prefix_caching=False),
        )
    )


def _run(engine: Engine, fused: bool, tag: str = "") -> list[tuple]:
    """Greedy tokens and their logprobs for three prompts of different lengths, decoded
    together (so decode steps have several rows and context lengths)."""
    engine.runner.model.fused_decode.enabled = fused
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1)
    requests = [
        Request(f"{tag}{i}", tuple(torch.randint(3, 4000, (n,), generator=gen).tolist()), params)
        for i, n in enumerate((5, 37, 70))
    ]
    return [(c.token_ids, [lp.logprob for lp in c.logprobs]) for c in engine.generate(requests)]


def _plan_runs(engine: Engine) -> bool:
    plan = engine.runner.model.fused_decode._plan
    return plan is not None and plan.weights is not None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", ["bf16", "w8a8+int8-kv"])
def test_fused_decode_matches_the_layer_loop(arch: str, config: str, tiny_model_dir) -> None:
    quantized = config != "bf16"
    kv = "int8" if quantized else "auto"
    engine = _engine(tiny_model_dir(arch), "w8a8" if quantized else "none", kv)
    fused = _run(engine, True)
    assert _plan_runs(engine)
    assert fused == _run(engine, False)


def test_fused_decode_steps_aside_for_hooks_and_follows_weight_edits(tiny_model_dir) -> None:
    engine = _engine(tiny_model_dir("llama"))
    baseline = _run(engine, True)
    assert _plan_runs(engine)
    model = engine.runner.model
    seen: list[int] = []
    proj = model.layers[1].mlp.down_proj
    handle = proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    hooked = _run(engine, True)
    handle.remove()
    assert hooked == baseline
    assert not _plan_runs(engine)
    assert seen.count(3) >= 19  # the hook saw every decode step (3 rows each)
    with torch.no_grad():  # an in-place edit: the packed copies must follow it
        proj.weight.mul_(-1.5)
    edited = _run(engine, True)
    assert _plan_runs(engine)
    assert edited != baseline
    assert edited == _run(engine, False)
