"""Weight loading: an HF-format directory's safetensors → our LlamaForCausalLM, fusing qkv and gate/up.

Also reads checkpoints written by `headrace quantize` and quantizes float ones at load.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from ops.linear import gemm_weight_dtype
from ops.rotation import MAX_BLOCK
from worker.models.calibration import (
    Feed,
    builtin_calibration_text,
    channel_absmax,
    collect_input_stats,
    input_xtx,
)
from worker.models.llama import LlamaForCausalLM, ModelArgs
from worker.models.quant_spec import QuantizationSpec
from worker.models.quantized import (
    DEFAULT_GROUP_SIZE,
    PROJECTIONS,
    convert_for_runtime,
    quantize_model,
    weight_bytes,
)
from worker.models.rope import RotaryEmbedding
from worker.models.smoothquant import DEFAULT_ALPHA, model_smoothing_factors

log = logging.getLogger(__name__)

# HF name suffix → (our fused parameter, index of the shard within it).
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def load_hf_config(model_dir: Path) -> Any:
    return AutoConfig.from_pretrained(model_dir)


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quantization: str = "none",
    feed: Feed | None = None,
) -> LlamaForCausalLM:
    """Build the model from `model_dir`'s config.json and load its *.safetensors weights.

    quantization: "none" loads the checkpoint as it is (float, or quantized by `headrace
    quantize`); "w8a8"/"w4a16"/"w4a16-g32" quantize a float checkpoint's projections:
    as `load_time_spec` says (w8a8 calibrated on the built-in calibration text: seconds on
    a GPU, up to a minute on a small CPU).
    feed: runs the calibration text through the model (`worker.engine.calibrate.feed_text`);
        needed by load-time quantization only.

    Raises:
        ValueError: asking for a scheme other than a quantized checkpoint's own.
    """
    config = load_hf_config(model_dir)
    args = ModelArgs.from_hf_config(config)
    stored = QuantizationSpec.from_hf_config(config)
    asked = "none" if quantization == "none" else load_time_spec(quantization).scheme
    if stored is not None and asked not in ("none", stored.scheme):
        raise ValueError(
            f"{model_dir} is a {stored.scheme} checkpoint (written by `headrace quantize`); "
            f"it cannot be loaded as {quantization}: pass --quantization none (or "
            f"{stored.scheme}), or quantize the float model instead"
        )
    rope = RotaryEmbedding(config, args.head_dim, max_positions).to(device)
    with torch.device("meta"):
        # On meta, so that a quantized checkpoint never allocates the float projections;
        # the cast comes first so it cannot touch the float32 scales swapped in after it.
        model = LlamaForCausalLM(args, rope).to(dtype)
        if stored is not None:
            convert_for_runtime(model, stored)
    model = model.to_empty(device=device)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _load_weights(model, sorted(model_dir.glob("*.safetensors")))
    model.eval().requires_grad_(False)
    if stored is not None:
        log.info("loaded a %s checkpoint: %.1f MiB of weights", stored.scheme, _mib(model))
    elif quantization != "none":
        before, start = _mib(model), time.perf_counter()
        spec = load_time_spec(quantization)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        calib_ids = tokenizer(builtin_calibration_text(), add_special_tokens=False).input_ids
        quantize_calibrated(model, spec, calib_ids[:LOAD_CALIB_TOKENS], feed)
        log.info(
            "quantized %d projections to %s (built-in calibration text) in %.1f s: weights "
            "%.1f MiB -> %.1f MiB (embeddings and lm_head kept in %s)",
            args.num_layers * len(PROJECTIONS),
            spec.describe(),
            time.perf_counter() - start,
            before,
            _mib(model),
            dtype,
        )
    gemm_dtype = gemm_weight_dtype(dtype, device)
    if model.set_gemm_dtype(gemm_dtype):
        log.info(
            "this CPU has no native %s GEMM: dense linear weights kept as %s (same values; "
            "the GEMMs run several times faster); weights now %.1f MiB",
            dtype,
            gemm_dtype,
            _mib(model),
        )
    scheme = stored.scheme if stored is not None else asked
    if scheme == "w8a8" and model.enable_logit_screen():
        # Greedy rows' tokens from an int8 copy of the lm_head, checked exactly: with int8
        # layers, a bf16 lm_head was up to half of a step (ops.logit_screen).
        log.info("greedy tokens through an int8 screen of the lm_head (exact argmax)")
    return model


# Tokens of the built-in calibration text used at load (all of it: ~1.8k for SmolLM2).
LOAD_CALIB_TOKENS = 2048


def load_time_spec(scheme: str, group_size: int | None = None) -> QuantizationSpec:
    """What `--quantization w8a8|w4a16|w4a16-g32` does to a float checkpoint (and `headrace
    quantize` without --calib), calibrated on the built-in text: w8a8 is SmoothQuant (α =
    DEFAULT_ALPHA) + a 64-channel Hadamard rotation + GPTQ; w4a16 is round-to-nearest with
    integer zero points in groups of `group_size` (default 128); w4a16-g32 round-to-nearest
    with real zero points in groups of 32.

    Each W8A8 step was measured on SmolLM2 (`headrace eval`, top-1 agreement): plain
    per-token int8 84.5%, SmoothQuant 89.4%, + rotation 95.0%, + GPTQ 95.3%.
    """
    if scheme == "w8a8":
        return QuantizationSpec(scheme, None, DEFAULT_ALPHA, gptq=True, rotation=MAX_BLOCK)
    if scheme == "w4a16-g32":
        if group_size not in (None, 32):
            raise ValueError(f"w4a16-g32 has groups of 32, not {group_size}")
        return QuantizationSpec("w4a16", 32, float_zeros=True)
    if scheme == "w4a16":
        return QuantizationSpec(scheme, group_size or DEFAULT_GROUP_SIZE)
    raise ValueError(f"no load-time quantization {scheme!r}")


def quantize_calibrated(
    model: LlamaForCausalLM, spec: QuantizationSpec, calib_ids: list[int], feed: Feed | None
) -> None:
    """Quantize the float `model` in place as `spec` says, calibrating on `calib_ids` (run
    through the model by `feed`) when it asks for SmoothQuant (activation abs-max) or GPTQ
    (input Hessians): one pass over the text collects both."""
    updates = {}
    if spec.smoothquant_alpha is not None:
        updates["absmax"] = channel_absmax
    if spec.gptq:
        updates["hessian"] = input_xtx
    if updates and feed is None:
        raise ValueError(f"{spec.describe()} calibrates: pass a feed (worker.engine.calibrate)")
    stats = collect_input_stats(model, calib_ids, updates, feed) if updates and feed else {}
    smooth = None
    if spec.smoothquant_alpha is not None:
        smooth = model_smoothing_factors(model, stats["absmax"], spec.smoothquant_alpha)
    quantize_model(model, spec, smooth, stats.get("hessian"))


def _mib(model: LlamaForCausalLM) -> float:
    return weight_bytes(model) / 2**20


def _load_weights(model: LlamaForCausalLM, files: list[Path]) -> None:
    if not files:
        raise FileNotFoundError("no *.safetensors files in the model directory")
    # Quantized modules hold their tensors as buffers.
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(model.named_buffers())
    fused_parts: dict[str, dict[int, torch.Tensor]] = {}
    loaded: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = hf_name.removeprefix("model.")
                if "rotary_emb" in name:
                    continue
                target, shard = _fused_target(name)
                tensor = f.get_tensor(hf_name)
                if target is None:
                    _copy(params, name, tensor)
                    loaded.add(name)
                else:
                    fused_parts.setdefault(target, {})[shard] = tensor
    for target, parts in fused_parts.items():
        _copy(params, target, torch.cat([parts[i] for i in sorted(parts)], dim=0))
        loaded.add(target)
    if model.args.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = [n for n in params if n not in loaded and not n.startswith("rope")]
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:5]}...")


def _fused_target(name: str) -> tuple[str | None, int]:
    for hf_part, (ours, shard) in _FUSED.items():
        if f".{hf_part}." in name:
            return name.replace(hf_part, ours), shard
    return None, 0


def _copy(params: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> None:
    if name not in params:
        raise ValueError(f"unexpected weight {name!r} in checkpoint")
    param = params[name]
    if param.shape != tensor.shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
    param.data.copy_(tensor)
