"""Calibration feed: a text run through a model on the engine's own paged-attention path.

Passed to `worker.models` (load-time quantization, `headrace quantize`) as its `Feed`,
so the models package needs no engine import: the text runs through a `ModelRunner`
with a KV cache of one window, in windows of `window` tokens, each a fresh sequence.
"""

from __future__ import annotations

import torch

from worker.config import CacheConfig
from worker.engine.model_runner import ModelRunner
from worker.engine.scheduler import ScheduledChunk
from worker.engine.sequence import Request, Sequence
from worker.models.llama import LlamaForCausalLM
from worker.params import SamplingParams

DEFAULT_WINDOW = 512
_BLOCK_SIZE = 16


@torch.inference_mode()
def feed_text(model: LlamaForCausalLM, token_ids: list[int], window: int = DEFAULT_WINDOW) -> None:
    """Run `token_ids` through `model` (forward passes only; results dropped), in windows.

    The KV cache and its dtype follow the model's embedding table (device and dtype).
    """
    if not token_ids:
        raise ValueError("the calibration text is empty")
    window = max(1, min(window, model.rope.cos.shape[0]))
    table = model.embed_tokens.weight
    num_blocks = -(-window // _BLOCK_SIZE)
    cache = CacheConfig(block_size=_BLOCK_SIZE, num_blocks=num_blocks)
    runner = ModelRunner(model, cache, table.dtype, table.device)
    for start in range(0, len(token_ids), window):
        ids = tuple(token_ids[start : start + window])
        seq = Sequence(Request("__calibration__", ids, SamplingParams(max_tokens=1)))
        seq.block_ids = list(range(-(-len(ids) // _BLOCK_SIZE)))
        runner.execute([ScheduledChunk(seq, len(ids))])
