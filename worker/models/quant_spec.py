"""QuantizationSpec: how a model's projections are quantized, and its record in a quantized
checkpoint's config.json ("headrace_quantization"), versioned.

Frozen and small: built once (from `--quantization` by `loader.load_time_spec`, from
`headrace quantize`'s flags, or read back from a checkpoint) and passed down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEMES = ("w8a8", "w4a16")
# 2 added W8A8's rotation and W4A16's float zero points; format 1 checkpoints (neither)
# still load.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)


@dataclass(frozen=True)
class QuantizationSpec:
    """How a model's projections are quantized; what `headrace quantize` records in
    config.json under "headrace_quantization".

    group_size: W4A16 only (None for W8A8). smoothquant_alpha: None when not calibrated
    (then no module has a `smooth` buffer); otherwise every module has one. gptq: weights
    from GPTQ (the tensors have the same format either way). rotation: W8A8 only, the
    largest Hadamard block of the input rotation (each projection takes the largest power
    of two up to it that divides its K; 0: none). float_zeros: W4A16 only, real zero points
    (float32) instead of integer ones (uint8).
    """

    scheme: str
    group_size: int | None = None
    smoothquant_alpha: float | None = None
    gptq: bool = False
    rotation: int = 0
    float_zeros: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if (self.scheme == "w4a16") != (self.group_size is not None):
            raise ValueError("group_size is set for w4a16 and only for w4a16")
        if self.rotation and self.scheme != "w8a8":
            raise ValueError("rotation applies to w8a8 only")
        if self.float_zeros and self.scheme != "w4a16":
            raise ValueError("float_zeros applies to w4a16 only")
        if self.rotation < 0 or self.rotation & (self.rotation - 1):
            raise ValueError(f"rotation must be 0 or a power of two, got {self.rotation}")

    def describe(self) -> str:
        """For logs, e.g. "w8a8 (SmoothQuant α=0.5, Hadamard rotation 64, GPTQ)"."""
        steps = [f"group size {self.group_size}"] if self.group_size else []
        if self.float_zeros:
            steps.append("float zero points")
        if self.smoothquant_alpha is not None:
            steps.append(f"SmoothQuant α={self.smoothquant_alpha}")
        if self.rotation:
            steps.append(f"Hadamard rotation {self.rotation}")
        steps.append("GPTQ" if self.gptq else "round to nearest")
        return f"{self.scheme} ({', '.join(steps)})"

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "group_size": self.group_size,
            "smoothquant_alpha": self.smoothquant_alpha,
            "gptq": self.gptq,
            "rotation": self.rotation,
            "float_zeros": self.float_zeros,
            "format_version": FORMAT_VERSION,
        }

    @classmethod
    def from_hf_config(cls, config: Any) -> QuantizationSpec | None:
        """The spec recorded in a model's config, or None for an ordinary float checkpoint."""
        meta = getattr(config, "headrace_quantization", None)
        if meta is None:
            return None
        if meta.get("format_version") not in READABLE_FORMATS:
            raise ValueError(
                f"quantized checkpoint format {meta.get('format_version')!r} is not supported "
                f"(this headrace reads formats {READABLE_FORMATS}); re-run `headrace quantize`"
            )
        return cls(
            meta["scheme"],
            meta.get("group_size"),
            meta.get("smoothquant_alpha"),
            bool(meta.get("gptq", False)),
            int(meta.get("rotation", 0)),
            bool(meta.get("float_zeros", False)),
        )
