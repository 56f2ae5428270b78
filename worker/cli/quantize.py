"""The `headrace quantize` verb: write a W8A8 (optionally SmoothQuant-calibrated) or W4A16 checkpoint.

The output is an HF-style directory that every headrace command loads with `--model DIR`
(`--quantization none` takes it as it is): config.json with an added
"headrace_quantization" record, the tokenizer and generation config copied, and one
model.safetensors holding the float tensors (embeddings, norms, an untied lm_head) under
their HF names and each fused projection's quantized tensors, e.g.
`model.layers.0.self_attn.qkv_proj.qweight`/`.scale`/`.smooth` (W8A8) or
`.packed`/`.scales`/`.zeros` (W4A16), plus `.bias` where the model has one. transformers
cannot load it (the projections stay fused and quantized).

Calibration: W8A8 is SmoothQuant-calibrated (activation outliers moved into the weights,
`--alpha`), its inputs rotated by a block Hadamard transform (`--rotation`), and its
weights quantized by GPTQ (error compensation weighted by the calibration inputs'
Hessian); W4A16 with `--calib` runs GPTQ, without it round-to-nearest. Without `--calib`
the result equals load-time quantization (`--quantization`), which calibrates W8A8 on the
built-in calibration text (worker/models/calib_en_zh.txt); `--calib FILE` replaces that text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from worker.config import DEFAULT_MODEL, DTYPES, QUANTIZATIONS, ModelConfig

if TYPE_CHECKING:
    from worker.models.quant_spec import QuantizationSpec

log = logging.getLogger(__name__)

# Everything but the weights and config.json: tokenizer, chat template, generation config.
_COPIED = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template*",
    "generation_config.json",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    # No torch import here (`headrace --help` imports every verb): the defaults of --alpha
    # and --rotation are filled in by `run` from the modules that own them.
    parser = subparsers.add_parser(
        "quantize",
        help="write a quantized (w8a8 / w4a16 / w4a16-g32) copy of a model",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="directory, hub id, .gguf or smollm2"
    )
    parser.add_argument(
        "--scheme", required=True, choices=[q for q in QUANTIZATIONS if q != "none"]
    )
    parser.add_argument("--output", required=True, type=Path, help="new (or empty) directory")
    parser.add_argument(
        "--calib",
        type=Path,
        default=None,
        help="calibration text: SmoothQuant and GPTQ (w8a8; default: the built-in text) or "
        "GPTQ (w4a16)",
    )
    parser.add_argument(
        "--calib-tokens", type=int, default=4096, help="use the text's first N tokens"
    )
    parser.add_argument(
        "--alpha", type=float, default=None, help="SmoothQuant migration strength (default 0.5)"
    )
    parser.add_argument(
        "--rotation",
        type=int,
        default=None,
        help="w8a8: largest Hadamard block rotating each projection's input (default 64; 0: none)",
    )
    parser.add_argument(
        "--group-size", type=int, default=None, help="w4a16: K per scale and zero (default 128)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=ModelConfig.dtype,
        help="precision of calibration, of the weights before quantizing, and of the float tensors",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ops.rotation import MAX_BLOCK
    from worker.models.smoothquant import DEFAULT_ALPHA

    args.alpha = DEFAULT_ALPHA if args.alpha is None else args.alpha
    args.rotation = MAX_BLOCK if args.rotation is None else args.rotation
    problem = _check_args(args)
    if problem:
        log.error("%s", problem)
        return 2
    from worker.models.loader import load_hf_config, load_time_spec
    from worker.models.quant_spec import QuantizationSpec
    from worker.models.source import resolve_model

    model_dir = resolve_model(args.model)
    stored = QuantizationSpec.from_hf_config(load_hf_config(model_dir))
    if stored is not None:
        log.error(
            "%s is already quantized (%s); quantize the float model", model_dir, stored.scheme
        )
        return 2
    spec = load_time_spec(args.scheme, args.group_size)
    if args.scheme == "w8a8":
        spec = dataclasses.replace(spec, smoothquant_alpha=args.alpha, rotation=args.rotation)
    elif args.calib is not None:
        spec = dataclasses.replace(spec, gptq=True)
    quantize_to_dir(model_dir, spec, args.output, args.dtype, args.calib, args.calib_tokens)
    return 0


def _check_args(args: argparse.Namespace) -> str | None:
    if args.calib is not None and not args.calib.is_file():
        return f"calibration file not found: {args.calib}"
    if not 0.0 <= args.alpha <= 1.0:
        return f"--alpha must be in [0, 1], got {args.alpha}"
    if args.rotation < 0 or args.rotation & (args.rotation - 1):
        return f"--rotation must be 0 or a power of two, got {args.rotation}"
    if args.group_size is not None:
        if args.scheme != "w4a16":
            return "--group-size is for --scheme w4a16 (w4a16-g32 has groups of 32)"
        if args.group_size <= 0 or args.group_size % 32:
            return f"--group-size must be a positive multiple of 32, got {args.group_size}"
    if args.calib_tokens < 1:
        return "--calib-tokens must be >= 1"
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        return f"{args.output} exists and is not an empty directory"
    return None


def quantize_to_dir(
    model_dir: Path,
    spec: QuantizationSpec,
    output: Path,
    dtype: str,
    calib: Path | None = None,
    calib_tokens: int = 4096,
) -> None:
    """Load `model_dir` (float), calibrate on `calib` (None: the built-in text) where `spec`
    needs it, quantize, write `output` (atomically)."""
    from safetensors.torch import save_file

    from worker.config import CacheConfig, EngineConfig
    from worker.engine.calibrate import feed_text
    from worker.engine.engine import Engine
    from worker.models.calibration import builtin_calibration_text
    from worker.models.loader import quantize_calibrated
    from worker.models.quantized import hf_state_dict, weight_bytes

    # Calibration runs its own small KV cache; the engine's is never used.
    cache = CacheConfig(block_size=16, num_blocks=1)
    engine = Engine(EngineConfig(model=ModelConfig(str(model_dir), dtype=dtype), cache=cache))
    model = engine.runner.model
    text = builtin_calibration_text() if calib is None else calib.read_text(encoding="utf-8")
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids[:calib_tokens]
    if spec.smoothquant_alpha is not None or spec.gptq:
        log.info(
            "%s: calibrating on %d tokens of %s",
            spec.describe(),
            len(ids),
            calib or "the built-in text",
        )
    before = weight_bytes(model)
    quantize_calibrated(model, spec, ids, feed_text)
    log.info(
        "%s: weights %.1f MiB -> %.1f MiB", spec.scheme, before / 2**20, weight_bytes(model) / 2**20
    )

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".quantize-", dir=output.parent))
    try:
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_config(model_dir, tmp, spec, dtype)
        for pattern in _COPIED:
            for file in model_dir.glob(pattern):
                shutil.copy2(file, tmp / file.name)
        # mkdtemp (and safetensors) make owner-only files; a model is for anyone to read.
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        if output.exists():
            output.rmdir()  # checked empty; rename needs it gone
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %s", output)


def _write_config(model_dir: Path, out: Path, spec: QuantizationSpec, dtype: str) -> None:
    # Edit the JSON itself (not a transformers round trip) so every other field stays as is.
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["headrace_quantization"] = spec.to_json()
    for key in ("torch_dtype", "dtype"):  # the float tensors are stored in `dtype`
        if key in config:
            config[key] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
