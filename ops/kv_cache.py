"""Paged KV cache ops with an optional int8 cache, dispatched to Triton on CUDA.

int8 scheme: symmetric, one scale per (token, kv head), kept in scale pools shaped like the
pages without the head_dim axis:

    key_cache, value_cache:             [num_blocks, block_size, num_kv_heads, head_dim] int8
    key_scale_cache, value_scale_cache: [num_blocks, block_size, num_kv_heads] float16/bf16/fp32

Pools may be token-major or head-major in storage (`allocate_kv_cache`,
`allocate_kv_scales`); every op here and every kernel addresses them through their strides.
A cached value dequantizes to `code * scale`. The scale is rounded to the pool's dtype before
the codes are computed, so codes and stored scale agree. float16 pools are the recommended
choice: with head_dim 64, a token's K and V take 2 * (64 + 2) bytes per kv head, 1.94x fewer
than bf16.

With full-precision caches (no scale pools) the CPU paths are `ops.attention`'s. The int8 CPU
paths convert the gathered codes of a step to the query dtype (exact) and fold the scales into
the scores and probabilities, as the kernels do tile by tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ops import attention as fp_ops
from ops import cpu_kernels
from ops.cpu_kernels import use_cpu_kernels
from ops.dispatch import use_triton
from ops.quant import INT8_MAX, MIN_SCALE, round_half_up


def allocate_kv_scales(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """One layer's K (or V) scale pool, zeroed: a [num_blocks, block_size, KVH] view of
    head-major storage, matching `ops.attention.allocate_kv_cache`'s pages."""
    pages = torch.zeros(num_blocks, num_kv_heads, block_size, dtype=dtype, device=device)
    return pages.permute(0, 2, 1)


def token_minor_keys(device: torch.device, block_size: int) -> bool:
    """Whether the key pools on `device` should be token-minor (`allocate_kv_cache`): where
    the CPU kernels run decode attention, with pages of whole vectors of tokens."""
    return (
        device.type == "cpu" and cpu_kernels.available() and block_size % cpu_kernels.lanes() == 0
    )


def decode_pads_to_longest(device: torch.device) -> bool:
    """Whether `paged_decode_attention` on `device` gathers every sequence of a call to the
    longest one's length (the torch path: callers split decodes into groups of similar
    length and pass the mask); the Triton and CPU kernels read each sequence's own pages."""
    return device.type != "cuda" and not cpu_kernels.available()


def quantize_kv(
    x: torch.Tensor, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, KVH, D] float → (int8 [T, KVH, D], scale [T, KVH] in scale_dtype)."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1) / INT8_MAX).clamp_min(MIN_SCALE).to(scale_dtype)
    q = round_half_up(x32 / scale.float().unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def reshape_and_cache_int8(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_scale_cache: torch.Tensor,
    value_scale_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Quantize new K/V per (token, kv head) and scatter codes and scales into their pages.

    key, value: [T, KVH, D]; slot_mapping: [T] int64, `block_id * block_size + offset`.
    """
    block_size = key_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    for x, cache, scales in (
        (key, key_cache, key_scale_cache),
        (value, value_cache, value_scale_cache),
    ):
        codes, scale = quantize_kv(x, scales.dtype)
        cache[blocks, offsets] = codes
        scales[blocks, offsets] = scale


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_scale_cache: torch.Tensor | None = None,
    value_scale_cache: torch.Tensor | None = None,
) -> None:
    """Write new K/V into the pages; int8 caches (with their scale pools) quantize on write."""
    if use_triton(key):
        from kernels.kv_cache import reshape_and_cache as kernel

        kernel(key, value, key_cache, value_cache, slot_mapping, key_scale_cache, value_scale_cache)
    elif use_cpu_kernels(key):
        torch.ops.headrace_cpu.reshape_and_cache(
            key, value, key_cache, value_cache, slot_mapping, key_scale_cache, value_scale_cache
        )
    elif key_scale_cache is None or value_scale_cache is None:
        fp_ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    else:
        reshape_and_cache_int8(
            key, value, key_cache, value_cache, key_scale_cache, value_scale_cache, slot_mapping
        )


def decode_mask(context_lens: torch.Tensor, span: int) -> torch.Tensor:
    """context_lens: [S] → [S, 1, 1, span] bool, True where position < context_len."""
    positions = torch.arange(span, device=context_lens.device)
    return (positions[None, :] < context_lens[:, None]).view(-1, 1, 1, span)


def _gather_head_major(
    pool: torch.Tensor, index: torch.Tensor, workspace: fp_ops.DecodeWorkspace, name: str
) -> torch.Tensor:
    """Rows `index` (from `DecodeWorkspace.gather_index`) of a [num_blocks, block_size, KVH, X]
    pool read head-major → [len(index), block_size * X], in a reused buffer."""
    pages = pool.permute(0, 2, 1, 3).contiguous()  # a no-op for head-major storage
    rows = pages.view(-1, pages.shape[2] * pages.shape[3])
    out = workspace.buffer(name, index.numel() * rows.shape[1], pool.dtype, pool.device)
    return torch.index_select(rows, 0, index, out=out.view(-1, rows.shape[1]))


def paged_decode_attention_int8(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_scale_cache: torch.Tensor,
    value_scale_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    workspace: fp_ops.DecodeWorkspace | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over its int8 pages (torch; the reference of the kernel).

    query: [S, H, D]; block_tables: [S, max_blocks]; context_lens: [S] → [S, H, D].
    The gathered pages are dequantized (`code * scale`, in query.dtype) into reused buffers
    and attended with SDPA; the kernel instead folds the K scales into the scores and the V
    scales into the probabilities, tile by tile, which is the same math up to rounding.
    """
    workspace = workspace or fp_ops.DecodeWorkspace()
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    span = block_tables.shape[1] * block_size
    index = workspace.gather_index(block_tables, num_kv_heads, block_size)
    shape = (num_seqs, num_kv_heads, span, head_dim)
    kv = {}
    pools = (("k", key_cache, key_scale_cache), ("v", value_cache, value_scale_cache))
    for name, pool, scale_pool in pools:
        codes = _gather_head_major(pool, index, workspace, f"{name}_codes").view(shape)
        page_scales = _gather_head_major(scale_pool.unsqueeze(-1), index, workspace, f"{name}_s")
        page_scales = page_scales.view(*shape[:3], 1).float()
        # code * scale in float32, rounded once to the query dtype.
        wide = workspace.buffer(f"{name}_f32", codes.numel(), torch.float32, query.device)
        wide = torch.mul(codes, page_scales, out=wide.view(shape))
        if query.dtype == torch.float32:
            kv[name] = wide
            continue
        out = workspace.buffer(f"{name}_dequant", codes.numel(), query.dtype, query.device)
        kv[name] = out.view(shape).copy_(wide)
    q = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    if mask is None:
        mask = decode_mask(context_lens, span)
    out = F.scaled_dot_product_attention(q, kv["k"], kv["v"], attn_mask=mask, scale=scale)
    return out.reshape(query.shape)


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    key_scale_cache: torch.Tensor | None = None,
    value_scale_cache: torch.Tensor | None = None,
    workspace: fp_ops.DecodeWorkspace | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """query: [S, H, D] → [S, H, D]; int8 caches when the scale pools are given.

    context_lens: [S] int32/int64; workspace: the CPU paths' reusable gather buffers;
    mask: [S, 1, 1, max_blocks * block_size] bool, `decode_mask(context_lens, span)` when the
    caller already has it (the CPU full-precision path needs it; built here otherwise).
    """
    if use_triton(query):
        from kernels.paged_attention import paged_decode_attention as kernel

        return kernel(
            query,
            key_cache,
            value_cache,
            block_tables,
            context_lens,
            scale,
            key_scale_cache,
            value_scale_cache,
        )
    if use_cpu_kernels(query):
        # Reads the pages in place (no gather into a workspace, no mask).
        return torch.ops.headrace_cpu.paged_decode_attention(
            query,
            key_cache,
            value_cache,
            block_tables,
            context_lens,
            scale,
            key_scale_cache,
            value_scale_cache,
        )
    if key_scale_cache is None or value_scale_cache is None:
        if mask is None:
            mask = decode_mask(context_lens, block_tables.shape[1] * key_cache.shape[1])
        return fp_ops.paged_decode_attention(
            query, key_cache, value_cache, block_tables, mask, scale, workspace
        )
    return paged_decode_attention_int8(
        query,
        key_cache,
        value_cache,
        key_scale_cache,
        value_scale_cache,
        block_tables,
        context_lens,
        scale,
        workspace,
        mask,
    )


def device_lens(
    cu_seqlens: list[int], context_lens: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefill kernel's int32 copies of cu_seqlens [P + 1] and context_lens [P]."""
    return (
        torch.tensor(cu_seqlens, dtype=torch.int32, device=device),
        torch.tensor(context_lens, dtype=torch.int32, device=device),
    )


def _dequantized_prefix(
    cache: torch.Tensor,
    scales: torch.Tensor,
    block_table: torch.Tensor,
    length: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The first `length` cached tokens of a sequence in `dtype`: [length, KVH, D]."""
    codes = fp_ops.gather_pages(cache, block_table, length).float()
    scale = fp_ops.gather_pages(scales, block_table, length).float()
    return (codes * scale.unsqueeze(-1)).to(dtype)


def prefill_attention_int8(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_scale_cache: torch.Tensor,
    value_scale_cache: torch.Tensor,
    cu_seqlens: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal prefill chunks over an int8 cache (torch; the reference of the kernel).

    The cached prefix (context_len - chunk tokens) is read from the int8 pages; the chunk
    attends to itself in full precision from `key`/`value`, as in the kernel.
    query: [T, H, D]; key, value: [T, KVH, D] → [T, H, D].
    """
    out = torch.empty_like(query)
    for i, context_len in enumerate(context_lens):
        start, end = cu_seqlens[i], cu_seqlens[i + 1]
        prefix = context_len - (end - start)
        k, v = key[start:end], value[start:end]
        mask = None
        if prefix:
            table = block_tables[i]
            k_pre = _dequantized_prefix(key_cache, key_scale_cache, table, prefix, k.dtype)
            v_pre = _dequantized_prefix(value_cache, value_scale_cache, table, prefix, v.dtype)
            k, v = torch.cat((k_pre, k)), torch.cat((v_pre, v))
            # Bottom-right aligned causal mask: query j sits at position prefix + j.
            q_pos = torch.arange(prefix, context_len, device=query.device)
            mask = torch.arange(context_len, device=query.device)[None, :] <= q_pos[:, None]
        o = fp_ops.sdpa(
            query[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask, scale
        )
        out[start:end] = o.transpose(0, 1)
    return out


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    cu_seqlens: list[int],
    context_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
    key_scale_cache: torch.Tensor | None = None,
    value_scale_cache: torch.Tensor | None = None,
    lens_on_device: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Varlen causal prefill (see `ops.attention.prefill_attention`); int8 with scale pools.

    lens_on_device: `cu_seqlens` and `context_lens` as int32 tensors on query's device, when
    the caller built them once for all layers (else built here: a host-to-device copy).
    """
    if use_triton(query):
        from kernels.prefill_attention import prefill_attention as kernel

        if lens_on_device is None:
            lens_on_device = device_lens(cu_seqlens, context_lens, query.device)
        chunks = [end - start for start, end in zip(cu_seqlens, cu_seqlens[1:], strict=False)]
        return kernel(
            query,
            key,
            value,
            key_cache,
            value_cache,
            *lens_on_device,
            block_tables,
            scale,
            max(chunks, default=0),
            key_scale_cache,
            value_scale_cache,
        )
    if _bf16_prefill_kernel_fits(query, key_cache, value_cache, key_scale_cache):
        if lens_on_device is None:
            lens_on_device = device_lens(cu_seqlens, context_lens, query.device)
        cu, ctx = lens_on_device
        return torch.ops.headrace_cpu.paged_prefill_attention(
            query, key_cache, value_cache, block_tables, cu, ctx, scale,
            key_scale_cache, value_scale_cache,
        )  # fmt: skip
    if key_scale_cache is None or value_scale_cache is None:
        return fp_ops.prefill_attention(
            query, key, value, key_cache, value_cache, cu_seqlens, context_lens, block_tables, scale
        )
    return prefill_attention_int8(
        query,
        key,
        value,
        key_cache,
        value_cache,
        key_scale_cache,
        value_scale_cache,
        cu_seqlens,
        context_lens,
        block_tables,
        scale,
    )


def _bf16_prefill_kernel_fits(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_scale_cache: torch.Tensor | None,
) -> bool:
    """Whether the AVX512-BF16 prefill kernel takes this step (kernels/cpu/prefill_attention.cpp):
    bf16 query, bf16 pages or int8 ones (scale pools with tokens at unit stride), token-minor
    keys, 16-token slices, whole 32-dim vectors, 1-8 query heads per kv head, on the hosts
    `cpu_kernels.use_bf16_prefill_attention` names. Elsewhere (float32, float16, AVX2 and AMX
    hosts) the torch path runs."""
    head_dim, kv_heads = query.shape[2], key_cache.shape[2]
    pages = torch.int8 if key_scale_cache is not None else torch.bfloat16
    return (
        query.dtype == torch.bfloat16
        and key_cache.dtype == value_cache.dtype == pages
        and (key_scale_cache is None or key_scale_cache.stride(1) == 1)
        and use_cpu_kernels(query)
        and cpu_kernels.use_bf16_prefill_attention()
        and key_cache.stride(1) == 1
        and value_cache.stride(3) == 1
        and key_cache.shape[1] % 16 == 0
        and head_dim % 32 == 0
        and head_dim <= 256
        and query.shape[1] % kv_heads == 0
        and query.shape[1] // kv_heads <= 8
    )
