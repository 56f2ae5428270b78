"""ModelRunner: turns a scheduled step into tensors, runs one forward pass, returns logits.

It owns the model and the paged KV cache; it never mutates sequences (the
engine applies the results) and the scheduler never touches tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq

import torch

from ops import cpu_kernels
from ops.attention import DecodeWorkspace, allocate_kv_cache
from ops.device import kernel_paths
from ops.kv_cache import (
    allocate_kv_scales,
    decode_mask,
    decode_pads_to_longest,
    device_lens,
    token_minor_keys,
)
from worker.config import CacheConfig
from worker.engine.cuda_graphs import DecodeGraphs
from worker.engine.logits import StepLogits
from worker.engine.scheduler import ScheduledChunk
from worker.models.attention import AttentionMetadata, DecodeGroup, LayerKVCache
from worker.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


# int8 caches keep one float16 scale per (token, kv head) beside the codes.
SCALE_DTYPE = torch.float16


def kv_bytes_per_block(
    model: LlamaForCausalLM, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto"
) -> int:
    """K and V of all layers for one page of `block_size` tokens (int8: codes + scales)."""
    args = model.args
    if kv_cache_dtype == "int8":
        per_head = args.head_dim + SCALE_DTYPE.itemsize
    else:
        per_head = args.head_dim * dtype.itemsize
    return 2 * args.num_layers * block_size * args.num_kv_heads * per_head


class ModelRunner:
    # A decode group closes once the next context is this much longer than its shortest.
    GROUP_SPREAD = 1.5

    def __init__(
        self,
        model: LlamaForCausalLM,
        cache_config: CacheConfig,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.model = model
        self.device = device
        if device.type == "cpu":
            cpu_kernels.load()  # built here, at start-up (once per machine), not mid-step
        self.kernel_paths = kernel_paths(device, dtype)
        self._pads = decode_pads_to_longest(device)
        log.info("kernels: %s", ", ".join(f"{k}: {v}" for k, v in self.kernel_paths.items()))
        self.block_size = cache_config.block_size
        per_block = kv_bytes_per_block(model, self.block_size, dtype, cache_config.dtype)
        self.num_blocks = cache_config.num_blocks or int(
            cache_config.memory_gib * 2**30 // per_block
        )
        if self.num_blocks < 1:
            raise ValueError(f"KV cache memory too small for one block ({per_block} bytes)")
        # One spare page past the allocator's: padded rows of a CUDA-graph decode write there.
        self.pad_block = self.num_blocks
        self.kv_caches = [
            self._allocate_layer(cache_config.dtype, dtype) for _ in range(model.args.num_layers)
        ]
        self.workspace = DecodeWorkspace()
        self.decode_graphs: DecodeGraphs | None = None
        log.info(
            "KV cache (%s): %d blocks x %d tokens = %d tokens (%.1f MiB, %d KiB per block)",
            "int8" if cache_config.dtype == "int8" else str(dtype).removeprefix("torch."),
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
            self.num_blocks * per_block / 2**20,
            per_block // 1024,
        )

    def _allocate_layer(self, kv_cache_dtype: str, dtype: torch.dtype) -> LayerKVCache:
        """Head-major K/V pools [num_blocks, block_size, KVH, D] (+ scale pools for int8);
        token-minor keys where the CPU kernels want them (`ops.kv_cache.token_minor_keys`)."""
        args = self.model.args
        shape = (self.num_blocks + 1, self.block_size, args.num_kv_heads, args.head_dim)
        pool_dtype = torch.int8 if kv_cache_dtype == "int8" else dtype
        key_layout = token_minor_keys(self.device, self.block_size)
        key = allocate_kv_cache(*shape, pool_dtype, self.device, token_minor=key_layout)
        value = allocate_kv_cache(*shape, pool_dtype, self.device)
        if kv_cache_dtype != "int8":
            return LayerKVCache(key, value)
        key_scale, value_scale = (
            allocate_kv_scales(*shape[:3], SCALE_DTYPE, self.device) for _ in range(2)
        )
        return LayerKVCache(key, value, key_scale, value_scale)

    def enable_decode_graphs(
        self, buckets: Seq[int], max_model_len: int, capture: bool = True
    ) -> None:
        """Run decode-only steps of up to max(buckets) sequences from persistent buffers,
        replaying CUDA graphs (`capture`, CUDA only) or calling the model on the padded
        buffers (`capture=False`: the same path without graphs, for tests on CPU)."""
        self.decode_graphs = None  # the old buffers go before the new ones are allocated
        self.decode_graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            buckets,
            max_model_len,
            self.block_size,
            self.pad_block,
            self.workspace,
            self._pads,
            capture,
        )

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @torch.inference_mode()
    def execute(
        self, chunks: Seq[ScheduledChunk], all_logits: bool = False
    ) -> tuple[StepLogits, list[ScheduledChunk]]:
        """Run one forward pass over `chunks`.

        Returns:
            the logits of the sampled positions ([num_sampled, vocab], computed as the
            sampler asks) and the chunks they belong to (those that reach their sequence's
            last token), in that row order.
            With `all_logits` (teacher-forced scoring): logits of every token of the step,
            [num_tokens, vocab], prefill chunks first in their given order, then decodes.
        """
        prefills = [c for c in chunks if c.num_new_tokens > 1]
        # Decodes sorted by context length so that groups of similar length share a padding.
        decodes = sorted(
            (c for c in chunks if c.num_new_tokens == 1), key=lambda c: c.seq.num_computed_tokens
        )
        self.workspace.new_step()
        ordered = prefills + decodes
        input_ids, positions, slots, sample_rows = [], [], [], []
        for chunk in ordered:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_new_tokens
            input_ids.extend(
                seq.all_token_ids[start:end] if chunk.num_new_tokens > 1 else [seq.token_at(start)]
            )
            positions.extend(range(start, end))
            slots.extend(
                seq.block_ids[p // self.block_size] * self.block_size + p % self.block_size
                for p in range(start, end)
            )
            if chunk.samples:
                sample_rows.append(len(input_ids) - 1)
        graphs = self.decode_graphs
        if graphs is not None and graphs.can_run(len(prefills), len(decodes)):
            hidden = graphs.run(
                input_ids,
                positions,
                slots,
                [c.seq.block_ids for c in decodes],
                [c.seq.num_computed_tokens + 1 for c in decodes],
            )
        else:
            meta = self._metadata(prefills, decodes, slots)
            hidden = self.model(self._long(input_ids), self._long(positions), self.kv_caches, meta)
        vocab = self.model.args.vocab_size
        if all_logits:
            return StepLogits(self.model, hidden, vocab), ordered
        logits = StepLogits(self.model, hidden[self._long(sample_rows)], vocab)
        return logits, [c for c in ordered if c.samples]

    def _metadata(
        self, prefills: list[ScheduledChunk], decodes: list[ScheduledChunk], slots: list[int]
    ) -> AttentionMetadata:
        cu_seqlens, context_lens = [0], []
        for chunk in prefills:
            cu_seqlens.append(cu_seqlens[-1] + chunk.num_new_tokens)
            context_lens.append(chunk.seq.num_computed_tokens + chunk.num_new_tokens)
        return AttentionMetadata(
            slot_mapping=self._long(slots),
            num_prefill_tokens=cu_seqlens[-1],
            prefill_cu_seqlens=cu_seqlens,
            prefill_context_lens=context_lens,
            prefill_block_tables=self._block_table([c.seq.block_ids for c in prefills])
            if prefills
            else None,
            decode_groups=self._decode_groups(decodes),
            workspace=self.workspace,
            prefill_lens_on_device=device_lens(cu_seqlens, context_lens, self.device)
            if prefills
            else None,
        )

    def _decode_groups(self, decodes: list[ScheduledChunk]) -> tuple[DecodeGroup, ...]:
        """Split length-sorted decodes where padding to the group's longest would waste most
        (only where attention pads: `ops.kv_cache.decode_pads_to_longest`; one call per
        layer for all decodes elsewhere)."""
        if not decodes:
            return ()
        lens = [c.seq.num_computed_tokens + 1 for c in decodes]
        if not self._pads:
            return (self._decode_group(decodes, lens, 0, len(decodes)),)
        groups, start = [], 0
        for i in range(1, len(decodes) + 1):
            if i == len(decodes) or (i - start >= 8 and lens[i] > self.GROUP_SPREAD * lens[start]):
                groups.append(self._decode_group(decodes, lens, start, i))
                start = i
        return tuple(groups)

    def _decode_group(
        self, decodes: list[ScheduledChunk], lens: list[int], start: int, end: int
    ) -> DecodeGroup:
        tables = self._block_table([c.seq.block_ids for c in decodes[start:end]])
        context_lens = torch.tensor(lens[start:end], dtype=torch.int32, device=self.device)
        # The kernels read context_lens; the torch path masks with it once per step, not per layer.
        mask = None
        if self._pads:
            mask = decode_mask(context_lens, tables.shape[1] * self.block_size)
        return DecodeGroup(start, end, tables, context_lens, mask)

    def _block_table(self, tables: list[list[int]]) -> torch.Tensor:
        """Pad page lists to one [num_seqs, max_blocks] int64 tensor (padding: page 0, masked out)."""
        width = max(len(t) for t in tables)
        return self._long([t + [0] * (width - len(t)) for t in tables])

    def _long(self, values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
