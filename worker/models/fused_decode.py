"""Model runner's decode-only steps on CPU: LlamaForCausalLM's layer loop as one kernel call.

`ops.decode_layers` runs the decoder layers of a step whose tokens all decode (no prefill
chunk) in one C++ loop over the same kernels the modules call. `FusedDecode` gathers what
that loop reads from the modules (norm weights, each projection's `decode_operands`) into a
`_Plan`, kept until a module, a parameter or buffer, or a hook of the layers changes
(gathering costs ~1 ms for SmolLM2's 30 layers, checking ~0.1 ms). Whatever the loop
cannot run as the modules would (a projection without packed operands, such as W4A16's;
norm weights of another dtype; a module with hooks, as calibration adds) makes the call
return None, and the caller runs the Python loop.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ops.decode_layers import ProjectionOperands, available, decode_layers

if TYPE_CHECKING:
    from worker.models.attention import AttentionMetadata, LayerKVCache
    from worker.models.llama import DecoderLayer, LlamaForCausalLM, Rope


@dataclass(frozen=True)
class _Plan:
    """The C++ loop's operands for one model and activation dtype, and what they were read
    from. weights / ints: `ops.decode_layers`' layout, or None where the loop cannot run."""

    dtype: torch.dtype
    weights: list[torch.Tensor | None] | None
    ints: list[int]
    slots: tuple[tuple[dict, str], ...]  # every module, parameter and buffer of the layers
    held: tuple[object, ...]  # what each slot held
    sources: tuple[torch.Tensor, ...]  # the weights the packed copies were made from
    versions: tuple[int, ...]  # theirs
    hook_dicts: tuple[dict, ...]  # the layers' modules' forward (pre-)hooks
    hooked: bool

    def current(self, dtype: torch.dtype) -> bool:
        return (
            dtype == self.dtype
            and all(map(operator.is_, [c.get(k) for c, k in self.slots], self.held))
            and tuple(t._version for t in self.sources) == self.versions
            and any(self.hook_dicts) == self.hooked
        )


class FusedDecode:
    """Runs a model's decode-only steps through `ops.decode_layers` where it can."""

    def __init__(self) -> None:
        self.enabled = True  # False: always the layer loop (to compare the two)
        self._plan: _Plan | None = None

    def __call__(
        self,
        model: LlamaForCausalLM,
        x: torch.Tensor,
        rope: Rope,
        kv_caches: list[LayerKVCache],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x: [T, hidden] embeddings → (last MLP output, residual), as the layer loop returns
        them; None where the step or the model is not one the C++ loop runs."""
        if not self.enabled or meta.num_prefill_tokens or len(meta.decode_groups) != 1:
            return None
        if not available(x):
            return None
        plan = self._plan
        if plan is None or not plan.current(x.dtype):
            plan = self._plan = _make_plan(model, x.dtype)
        if plan.weights is None:
            return None
        caches = [t for c in kv_caches for t in (c.key, c.value, c.key_scale, c.value_scale)]
        group = meta.decode_groups[0]
        args = model.args
        return decode_layers(
            x,
            *rope,
            plan.weights,
            plan.ints,
            caches,
            meta.slot_mapping,
            group.block_tables,
            group.context_lens,
            (args.num_heads, args.num_kv_heads, args.head_dim),
            args.rms_norm_eps,
            args.head_dim**-0.5,
        )


def _make_plan(model: LlamaForCausalLM, dtype: torch.dtype) -> _Plan:
    slots: list[tuple[dict, str]] = []
    hook_dicts: list[dict] = []
    for i, layer in enumerate(model.layers):
        slots.append((model.layers._modules, str(i)))
        for module in layer.modules():
            hook_dicts += [module._forward_pre_hooks, module._forward_hooks]
            for store in (module._modules, module._parameters, module._buffers):
                slots.extend((store, key) for key in store)
    weights: list[torch.Tensor | None] | None = []
    ints: list[int] = []
    sources: list[torch.Tensor] = []
    hooked = any(hook_dicts)  # hooks see each module's call: only the layer loop makes them
    for layer in model.layers:
        if weights is not None and (hooked or not _add_layer(layer, dtype, weights, ints, sources)):
            weights = None
    return _Plan(
        dtype,
        weights,
        ints,
        tuple(slots),
        tuple(c.get(k) for c, k in slots),
        tuple(sources),
        tuple(t._version for t in sources),
        tuple(hook_dicts),
        hooked,
    )


def _add_layer(
    layer: DecoderLayer,
    dtype: torch.dtype,
    weights: list[torch.Tensor | None],
    ints: list[int],
    sources: list[torch.Tensor],
) -> bool:
    """Append `layer`'s entries (`ops.decode_layers`' per-layer layout) and the weights its
    packed copies come from; False if the C++ loop cannot run it."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm, attn.k_norm)
    if any(n is not None and n.weight.dtype != dtype for n in norms):
        return False
    projections = []
    for module, gated in (
        (attn.qkv_proj, False),
        (attn.o_proj, False),
        (mlp.gate_up_proj, True),
        (mlp.down_proj, False),
    ):
        operands = getattr(module, "decode_operands", None)
        found: ProjectionOperands | None = operands(dtype, gated) if operands else None
        if found is None:
            return False
        projections.append(found)
    weights.extend(None if n is None else n.weight for n in norms)
    for p in projections:
        weights += [p.packed, p.bias, p.w_scale, p.smooth]
        ints += [p.columns, p.rotation]
        sources.append(p.source)
    return True
