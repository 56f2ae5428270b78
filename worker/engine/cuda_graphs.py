"""CUDA graphs for decode-only steps: the layer loop replayed from persistent input buffers.

A decode step launches a few kernels per layer, each for a handful of rows; at small
batches the CPU's launch overhead, not the GPU, sets the step time. `DecodeGraphs` captures
the model's forward (embedding → layers → final norm) once per bucket of batch sizes, and a
step of `b` sequences replays the graph of the smallest bucket ≥ b after copying its inputs
into the first `b` rows of the buffers (the scheme of vLLM and nano-vllm). Mixed and prefill
steps, and batches above the largest bucket, run eagerly.

Padded rows: token 0 at position 0, writing its K/V into the runner's spare page
(`ModelRunner.pad_block`, never handed to a sequence) and attending to that one token, so a
padded row computes garbage that nothing reads and writes nowhere a sequence owns.

What a captured graph fixes at capture time, and how it is kept valid:
- tensor shapes and addresses: the buffers below are allocated once; metadata views them;
- the decode attention's block-table width (the Triton launcher sizes its partitions from
  it, on the host): the buffers are `max_model_len` wide, so any context fits;
- one decode group (attention pads to the group's longest only on the torch path, which
  never runs on CUDA).

Without CUDA (or with `capture=False`) `run` calls the model eagerly on the same padded
buffers, so the filling and padding logic is tested on CPU against the ordinary eager path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq

import torch

from ops.attention import DecodeWorkspace
from ops.kv_cache import decode_mask
from worker.models.attention import AttentionMetadata, DecodeGroup, LayerKVCache
from worker.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_sizes(max_num_seqs: int, buckets: Seq[int] = BUCKETS) -> tuple[int, ...]:
    """The buckets a scheduler of `max_num_seqs` can fill, ascending, with `max_num_seqs`
    itself as the last one when it is not a bucket (so every decode batch has a graph)."""
    sizes = sorted({b for b in buckets if b < max_num_seqs} | {min(max_num_seqs, max(buckets))})
    return tuple(sizes)


class DecodeGraphs:
    """Persistent decode inputs and one forward per bucket, captured as a CUDA graph.

    Args:
        model: the runner's model; kv_caches: its pools (with the spare page `pad_block`).
        buckets: batch sizes to capture, e.g. `bucket_sizes(max_num_seqs)`.
        max_model_len: the longest context; sets the block tables' width.
        block_size: tokens per page; pad_block: the page padded rows write to.
        workspace: the runner's decode workspace (CPU attention paths only).
        pads: whether decode attention needs a mask (`ops.kv_cache.decode_pads_to_longest`).
        capture: record CUDA graphs (CUDA only); False replays by calling the model eagerly.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[LayerKVCache],
        buckets: Seq[int],
        max_model_len: int,
        block_size: int,
        pad_block: int,
        workspace: DecodeWorkspace,
        pads: bool,
        capture: bool,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = tuple(sorted(buckets))
        self.block_size = block_size
        self.pad_block = pad_block
        self.workspace = workspace
        self.pads = pads
        device = kv_caches[0].key.device
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        n, width = self.buckets[-1], -(-max_model_len // block_size)
        # Persistent inputs: graphs read them at fixed addresses. One [4, n] int64 buffer
        # (token ids, positions, slots, context lengths) takes a step's rows in one copy;
        # the graph itself casts the context lengths to attention's int32 `context_lens`.
        self._rows = torch.zeros(4, n, dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping = self._rows[:3]
        self.block_tables = torch.zeros(n, width, dtype=torch.long, device=device)  # [n, width]
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(
            n, model.args.hidden_size, dtype=model.embed_tokens.weight.dtype, device=device
        )
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self.capture()

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def can_run(self, num_prefills: int, num_decodes: int) -> bool:
        """Decode-only steps of at most the largest bucket (others run eagerly)."""
        return num_prefills == 0 and 0 < num_decodes <= self.max_batch

    def bucket(self, batch: int) -> int:
        """The smallest bucket ≥ batch."""
        return next(b for b in self.buckets if b >= batch)

    def _pad_all(self) -> None:
        """Every row of the inputs becomes padding (see the module docstring)."""
        self._rows.copy_(self._padding(self._rows.shape[1]).to(self._rows.device))
        self.block_tables.fill_(self.pad_block)

    def _padding(self, rows: int) -> torch.Tensor:
        """`rows` padded rows as [4, rows] int64: token 0 at position 0 in the spare page."""
        pad = torch.tensor([0, 0, self.pad_block * self.block_size, 1])
        return pad[:, None].expand(4, rows)

    def _metadata(self, bucket: int) -> AttentionMetadata:
        """The first `bucket` rows of the buffers as one decode group (views, no copies)."""
        tables, lens = self.block_tables[:bucket], self.context_lens[:bucket]
        mask = decode_mask(lens, tables.shape[1] * self.block_size) if self.pads else None
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            num_prefill_tokens=0,
            prefill_cu_seqlens=[0],
            prefill_context_lens=[],
            prefill_block_tables=None,
            decode_groups=(DecodeGroup(0, bucket, tables, lens, mask),),
            workspace=self.workspace,
        )

    def _forward(self, bucket: int) -> None:
        """The eager forward of the first `bucket` rows into `hidden` (what a graph records)."""
        ids, pos = self.input_ids[:bucket], self.positions[:bucket]
        self.context_lens[:bucket] = self._rows[3, :bucket]
        self.hidden[:bucket] = self.model(ids, pos, self.kv_caches, self._metadata(bucket))

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket, largest first, all in one memory pool.

        NOTE: every row is padding while capturing, so the warm-up and the captured run
        write K/V only into the spare page.
        """
        self._pad_all()
        pool = None
        for bucket in reversed(self.buckets):
            self._forward(bucket)  # warm-up: Triton compiles, cuBLAS picks its kernels
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self._forward(bucket)
            pool = graph.pool() if pool is None else pool
            self._graphs[bucket] = graph
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batches %s", list(self.buckets))

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        block_tables: list[list[int]],
        context_lens: list[int],
    ) -> torch.Tensor:
        """One decode step of `b = len(input_ids)` sequences (one token each).

        block_tables: each sequence's page ids (ragged); context_lens: tokens after this step.
        Returns the final-normed hidden states [b, hidden] (a view of `hidden`, valid until
        the next call).
        """
        batch = len(input_ids)
        bucket = self.bucket(batch)
        rows = torch.tensor([input_ids, positions, slots, context_lens])
        if bucket > batch:
            rows = torch.cat((rows, self._padding(bucket - batch)), dim=1)
        width = max(len(t) for t in block_tables)
        tables = [t + [self.pad_block] * (width - len(t)) for t in block_tables]
        tables += [[self.pad_block] * width] * (bucket - batch)
        # NOTE: columns past `width` keep earlier steps' page ids: valid pages (every value
        # ever written is one) beyond every row's context, so attention never reads them.
        self._rows[:, :bucket].copy_(rows, non_blocking=True)
        self.block_tables[:bucket, :width].copy_(torch.tensor(tables), non_blocking=True)
        graph = self._graphs.get(bucket)
        if graph is None:
            self._forward(bucket)
        else:
            graph.replay()
        return self.hidden[:batch]
