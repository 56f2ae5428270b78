"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over a flattened token batch.

One implementation covers them all: they differ only in qkv bias (Qwen2),
per-head q/k RMSNorm (Qwen3), RoPE scaling (Llama 3) and tied embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ops.activation import silu_and_mul
from ops.decode_layers import ProjectionOperands
from ops.linear import PackedCopy, gated_packed_weight, linear, linear_silu, packed_weight
from ops.logit_screen import LogitScreen, build_logit_screen, screened_argmax
from ops.norm import fused_add_rms_norm, rms_norm
from ops.rotary import apply_rotary_at
from worker.models.attention import AttentionMetadata, LayerKVCache, PagedAttention
from worker.models.fused_decode import FusedDecode
from worker.models.rope import RotaryEmbedding

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelArgs:
        model_type = config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )


class Linear(nn.Linear):
    """nn.Linear whose GEMM goes through `ops.linear` (weights may be kept in float32 on CPUs
    without native bf16/fp16 GEMMs; see `LlamaForCausalLM.set_gemm_dtype`).

    Where `ops.linear` runs GEMMs from a packed copy of the weight, the copy follows the
    weight (`ops.linear.PackedCopy`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed = PackedCopy(packed_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in_features] → [T, out_features] in x.dtype."""
        return linear(x, self.weight, self.bias, self.packed.get(self.weight))

    def decode_operands(self, dtype: torch.dtype, gated: bool = False) -> ProjectionOperands | None:
        """This projection as `ops.decode_layers` runs it for `dtype` activations: our packed
        bf16 weight (gated: gate/up interleaved, silu in the epilogue); None where forward
        would not run that kernel (another dtype, oneDNN or no packing, hooks)."""
        if self._forward_pre_hooks or self._forward_hooks or self.weight.dtype != dtype:
            return None
        packed = self._gated_packed() if gated else self.packed.get(self.weight)
        if packed is None or packed.is_mkldnn:
            return None
        columns = self.out_features // 2 if gated else self.out_features
        return ProjectionOperands(packed, self.weight, self.bias, columns=columns)

    def _gated_packed(self) -> torch.Tensor | None:
        return None  # a plain projection has no fused activation


class GatedLinear(Linear):
    """The fused gate_up projection of the MLP: `silu(x)` returns silu(gate) * up of its
    output, in one GEMM where `ops.linear` has it (`linear_silu`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.gated = PackedCopy(gated_packed_weight)

    def silu(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in_features] → [T, out_features // 2] in x.dtype."""
        gated = None
        # Calibration's hooks watch forward(); the fused GEMM takes 2-D x of the weight dtype.
        if not (self._forward_pre_hooks or self._forward_hooks) and x.dim() == 2:
            gated = self.gated.get(self.weight) if x.dtype == self.weight.dtype else None
        if gated is None:
            return silu_and_mul(self(x))
        return linear_silu(x, self.weight, self.bias, gated)

    def _gated_packed(self) -> torch.Tensor | None:
        return self.gated.get(self.weight)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back, then scaled (the order HF uses; `ops.norm`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); may overwrite both inputs (`ops.norm`)."""
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


Rope = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # positions [T], cos and sin tables


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            args.num_heads,
            args.num_kv_heads,
            args.head_dim,
        )
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        # q, k and v projections fused into one GEMM (split after).
        self.qkv_proj = Linear(args.hidden_size, self.q_size + 2 * self.kv_size, args.qkv_bias)
        self.o_proj = Linear(self.q_size, args.hidden_size, args.o_bias)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.attn = PagedAttention(args.num_heads, args.num_kv_heads, args.head_dim)

    def forward(
        self, x: torch.Tensor, rope: Rope, kv_cache: LayerKVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """x: [T, hidden] → [T, hidden]."""
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_at(q, k, *rope)
        o = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(o.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.intermediate_size = args.intermediate_size
        self.gate_up_proj = GatedLinear(args.hidden_size, 2 * args.intermediate_size, args.mlp_bias)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GatedLinear, and W8A8's module that replaces it, apply the activation in the GEMM
        # where they can; W4A16's has no such path.
        fused = getattr(self.gate_up_proj, "silu", None)
        if fused is not None:
            return self.down_proj(fused(x))
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: Rope,
        kv_cache: LayerKVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden], the previous layer's MLP output (its input, for the first layer);
        residual: the stream before it (None for the first layer).

        Returns (this layer's MLP output, the residual stream before it): adding the two is
        the layer's output in HF's terms, done by the next norm (`RMSNorm.add_and_norm`).
        """
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        attn = self.self_attn(h, rope, kv_cache, meta)
        h, residual = self.post_attention_layernorm.add_and_norm(attn, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Decoder over a flattened batch: `forward(input_ids [T], positions [T], ...) -> [T, hidden]`."""

    def __init__(self, args: ModelArgs, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.args = args
        self.rope = rope
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.fused_decode = FusedDecode()  # decode-only steps in one C++ call, where it runs
        self.logit_screen: LogitScreen | None = None  # `enable_logit_screen`

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[LayerKVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: [T] int64 → final-normed hidden states [T, hidden]."""
        x = self.embed_tokens(input_ids)
        rope = (positions, *self.rope.tables(x.dtype, x.device))
        fused = self.fused_decode(self, x, rope, kv_caches, meta)
        if fused is not None:
            x, residual = fused
        else:
            residual = None
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                x, residual = layer(x, residual, rope, kv_cache, meta)
        return self.norm.add_and_norm(x, residual)[0]

    def set_gemm_dtype(self, gemm_dtype: torch.dtype) -> bool:
        """Keep the dense linear weights (and biases) in `gemm_dtype`; True if any changed.

        A tied lm_head gets its own copy: the embedding table keeps the model dtype.
        """
        changed = False
        if self.args.tie_word_embeddings and self.lm_head.weight.dtype != gemm_dtype:
            self.lm_head.weight = nn.Parameter(self.embed_tokens.weight.detach().clone(), False)
        for module in self.modules():
            if isinstance(module, Linear) and module.weight.dtype != gemm_dtype:
                module.to(gemm_dtype)
                changed = True
        return changed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [S, hidden] (only the positions being sampled) → logits [S, vocab] in the
        model dtype (the sampler widens what it needs: greedy rows never are)."""
        return self.lm_head(hidden)

    def enable_logit_screen(self) -> bool:
        """From now on, `greedy_tokens` rules out most of the vocabulary with an int8 copy of
        the lm_head (ops.logit_screen) and scores the rest exactly; False where that cannot
        run (the lm_head then computes every logit). Call once the weights are final."""
        self.logit_screen = build_logit_screen(self.lm_head.weight)
        return self.logit_screen is not None

    def greedy_tokens(self, hidden: torch.Tensor, vocab: int) -> torch.Tensor:
        """hidden: [S, hidden] → [S] int64, each row's first largest float32 logit among the
        first `vocab`, through the logit screen (`enable_logit_screen` must have succeeded)."""
        screen = self.logit_screen
        assert screen is not None, "greedy_tokens needs a logit screen"
        return screened_argmax(hidden.to(screen.weight.dtype), screen, vocab)
