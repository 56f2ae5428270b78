"""`headrace eval`: the accuracy cost of quantization, measured against the unquantized model.

Each configuration (int8 KV cache, W8A8, W8A8 + int8 KV, W4A16) scores a text teacher-forced,
as consecutive prefill chunks through the paged KV cache (`Engine.score`), and is compared
position by position with the unquantized model at the same dtype: top-1 agreement (the
argmax next token is the reference's) and perplexity of the text's actual next tokens.

The default text, `bench/data/eval_en_zh.txt`, is public domain, reproduced from memory
(minor variants from printed editions possible). English: the opening of the US Declaration
of Independence (1776), Lincoln's Gettysburg Address (1863), chapter 1 of Jane Austen's
*Pride and Prejudice* (1813). Chinese: the openings of Lu Xun's 《故乡》 (1921) and Zhu
Ziqing's 《背影》 (1925), and Tao Yuanming's 《桃花源记》 (5th century) whole.

NOTE: ~330 lines: scoring, comparison and the report of one measurement.
"""

from __future__ import annotations

import gc
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_TEXT = Path(__file__).parent / "data" / "eval_en_zh.txt"

# name → (weight quantization, KV cache dtype); the reference is ("none", "auto").
CONFIGS: dict[str, tuple[str, str]] = {
    "int8-kv": ("none", "int8"),
    "w8a8": ("w8a8", "auto"),
    "w8a8+int8-kv": ("w8a8", "int8"),
    "w4a16": ("w4a16", "auto"),
    "w4a16-g32": ("w4a16-g32", "auto"),
}
REFERENCE = "reference"  # the unquantized model again: the measurement's noise floor
CONFIG_SETTINGS: dict[str, tuple[str, str]] = {**CONFIGS, REFERENCE: ("none", "auto")}

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


@dataclass(frozen=True)
class Target:
    """An accuracy bound: top-1 agreement at least `min_top1`, and perplexity at most
    `max_ppl_increase` (a fraction: 0.01 = 1%) above the reference's."""

    min_top1: float
    max_ppl_increase: float


# The issue's targets on SmolLM2. W8A8 alone has none: it is reported without a verdict.
# W4A16's applies to both layouts: groups of 128 (the issue's) and of 32 (GGUF Q4_1's).
TARGETS: dict[str, Target] = {
    "int8-kv": Target(0.99, 0.01),
    "w8a8+int8-kv": Target(0.95, 0.05),
    "w4a16": Target(0.90, 0.10),
    "w4a16-g32": Target(0.90, 0.10),
}


@dataclass(frozen=True)
class Segment:
    """A run of paragraphs of one language, tokenized (no special tokens, no chat template)."""

    language: str  # "zh" when most letters are Han characters, else "en"
    token_ids: tuple[int, ...]


def paragraph_language(text: str) -> str:
    """'zh' when most non-space characters are Han characters, else 'en'."""
    chars = [c for c in text if not c.isspace()]
    han = sum(1 for c in chars if _HAN.match(c))
    return "zh" if chars and han * 2 >= len(chars) else "en"


def split_segments(text: str, encode: Callable[[str], list[int]], max_tokens: int) -> list[Segment]:
    """Pack consecutive same-language paragraphs (blank-line separated) into segments of at
    most `max_tokens` tokens; a paragraph longer than that is cut into token windows."""
    if max_tokens < 2:
        raise ValueError("max_tokens must be >= 2")
    segments: list[Segment] = []
    language, parts = "", []

    def flush() -> None:
        if parts:
            ids = encode("\n\n".join(parts))
            for start in range(0, len(ids), max_tokens):
                if len(ids) - start >= 2:  # one token predicts nothing
                    segments.append(Segment(language, tuple(ids[start : start + max_tokens])))
            parts.clear()

    for paragraph in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not paragraph:
            continue
        lang = paragraph_language(paragraph)
        if parts and (
            lang != language or len(encode("\n\n".join([*parts, paragraph]))) > max_tokens
        ):
            flush()
        language = lang
        parts.append(paragraph)
    flush()
    return segments


# -- metrics (pure) --------------------------------------------------------------


def next_token_stats(logits: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per predicted position, the model's top-1 and the NLL of the actual next token.

    Args:
        logits: [T, V], row t the prediction after token t.
        token_ids: [T] the text.
    Returns:
        argmax [T-1] int64 and nll [T-1] float64, for the predictions of tokens 1..T-1.
    """
    assert logits.dim() == 2 and token_ids.shape == (logits.shape[0],), (
        logits.shape,
        token_ids.shape,
    )
    logprobs = torch.log_softmax(logits[:-1].double(), dim=-1)  # [T-1, V]
    nll = -logprobs.gather(1, token_ids[1:, None].long()).squeeze(1)  # [T-1]
    return logits[:-1].argmax(dim=-1), nll


def top1_agreement(argmax: torch.Tensor, ref_argmax: torch.Tensor) -> float:
    """Fraction of positions whose top-1 equals the reference's. argmax, ref_argmax: [N]."""
    assert argmax.shape == ref_argmax.shape and argmax.numel() > 0
    return (argmax == ref_argmax).double().mean().item()


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL) over the positions. nll: [N]."""
    assert nll.dim() == 1 and nll.numel() > 0
    return math.exp(nll.double().mean().item())


@dataclass(frozen=True)
class TextScores:
    """One configuration's predictions over every segment, concatenated: argmax, nll: [N]."""

    argmax: torch.Tensor
    nll: torch.Tensor
    languages: tuple[str, ...]  # per position


def score_segments(engine: Any, segments: Sequence[Segment], chunk_size: int) -> TextScores:
    """Run each segment through `engine.score` and keep only what the metrics need."""
    argmaxes, nlls, languages = [], [], []
    for segment in segments:
        ids = list(segment.token_ids)
        logits = engine.score(ids, chunk_size=chunk_size)  # [T, V]
        argmax, nll = next_token_stats(logits, torch.tensor(ids))
        argmaxes.append(argmax.cpu())
        nlls.append(nll.cpu())
        languages += [segment.language] * len(nll)
    return TextScores(torch.cat(argmaxes), torch.cat(nlls), tuple(languages))


@dataclass(frozen=True)
class EvalResult:
    """One configuration against the reference, overall and per language."""

    config: str
    top1_agreement: float
    ppl: float
    ppl_ref: float
    tokens: int  # predicted positions counted
    by_language: dict[str, dict[str, float]] = field(default_factory=dict)
    target: Target | None = None

    @property
    def ppl_increase(self) -> float:
        """Relative perplexity increase over the reference (0.01 = 1%; negative: lower)."""
        return self.ppl / self.ppl_ref - 1.0

    @property
    def passed(self) -> bool | None:
        """Whether the target is met; None without a target."""
        if self.target is None:
            return None
        return (
            self.top1_agreement >= self.target.min_top1
            and self.ppl_increase <= self.target.max_ppl_increase
        )

    def to_dict(self) -> dict[str, Any]:
        target = self.target
        return {
            "config": self.config,
            "top1_agreement": self.top1_agreement,
            "ppl": self.ppl,
            "ppl_ref": self.ppl_ref,
            "ppl_increase_pct": 100 * self.ppl_increase,
            "tokens": self.tokens,
            "target_top1": target.min_top1 if target else None,
            "target_ppl_increase_pct": 100 * target.max_ppl_increase if target else None,
            "passed": self.passed,
            "by_language": self.by_language,
        }


def compare(config: str, scores: TextScores, ref: TextScores) -> EvalResult:
    """Metrics of `scores` against the reference's, overall and per language."""
    assert scores.languages == ref.languages, "scored a different text than the reference"
    by_language = {}
    for lang in sorted(set(ref.languages)):
        mask = torch.tensor([x == lang for x in ref.languages])
        by_language[lang] = {
            "tokens": int(mask.sum()),
            "top1_agreement": top1_agreement(scores.argmax[mask], ref.argmax[mask]),
            "ppl": perplexity(scores.nll[mask]),
            "ppl_ref": perplexity(ref.nll[mask]),
        }
    return EvalResult(
        config=config,
        top1_agreement=top1_agreement(scores.argmax, ref.argmax),
        ppl=perplexity(scores.nll),
        ppl_ref=perplexity(ref.nll),
        tokens=len(ref.languages),
        by_language=by_language,
        target=TARGETS.get(config),
    )


def format_table(results: Sequence[EvalResult], header: str = "") -> str:
    """A readable table: one row per configuration, per-language agreement beside."""
    langs = sorted({lang for r in results for lang in r.by_language})
    lines = [header] if header else []
    head = f"{'config':14s} {'top-1':>7s} {'ppl':>9s} {'ppl ref':>9s} {'Δppl':>7s} {'tokens':>6s}"
    head += "".join(f" {'top-1 ' + lang:>9s}" for lang in langs) + "  target"
    lines += [head, "-" * len(head)]
    for r in results:
        row = f"{r.config:14s} {100 * r.top1_agreement:6.2f}% {r.ppl:9.3f} {r.ppl_ref:9.3f}"
        row += f" {100 * r.ppl_increase:+6.2f}% {r.tokens:6d}"
        for lang in langs:
            stats = r.by_language.get(lang)
            row += f" {100 * stats['top1_agreement']:8.2f}%" if stats else f" {'-':>9s}"
        if r.target is None:
            row += "  —"
        else:
            verdict = "pass" if r.passed else "FAIL"
            row += f"  ≥{100 * r.target.min_top1:.0f}%, ≤{100 * r.target.max_ppl_increase:.0f}%: {verdict}"
        lines.append(row)
    return "\n".join(lines)


# -- the run -----------------------------------------------------------------------


def engine_config(
    model: str, dtype: str, config: str, max_segment_tokens: int, threads: int | None = None
) -> Any:
    """The EngineConfig of `config` (a CONFIG_SETTINGS name): a KV cache of one segment."""
    from worker.config import CacheConfig, EngineConfig, ModelConfig

    quantization, kv_dtype = CONFIG_SETTINGS[config]
    block_size = CacheConfig.block_size
    return EngineConfig(
        model=ModelConfig(source=model, dtype=dtype, quantization=quantization),
        cache=CacheConfig(
            block_size=block_size, num_blocks=-(-max_segment_tokens // block_size), dtype=kv_dtype
        ),
        num_threads=threads,
    )


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def segments_of(engine: Any, text: str, max_segment_tokens: int) -> list[Segment]:
    """`text` split into segments with the engine's tokenizer, each fitting its context."""
    tokenizer, max_tokens = engine.tokenizer, min(max_segment_tokens, engine.max_model_len)
    segments = split_segments(
        text, lambda s: tokenizer(s, add_special_tokens=False).input_ids, max_tokens
    )
    if not segments:
        raise ValueError("no text to score (it needs at least two tokens)")
    return segments


def evaluate(
    model: str,
    dtype: str,
    configs: Sequence[str],
    text: str,
    *,
    chunk_size: int = 64,
    max_segment_tokens: int = 512,
    threads: int | None = None,
) -> Iterator[EvalResult]:
    """Score `text` with the reference, then with each of `configs`, one Engine at a time
    (each released before the next loads); yield each EvalResult as it finishes."""
    from worker.engine.engine import Engine

    def build(config: str) -> Any:
        return Engine(engine_config(model, dtype, config, max_segment_tokens, threads))

    start = time.perf_counter()
    engine = build(REFERENCE)
    segments = segments_of(engine, text, max_segment_tokens)
    ref = score_segments(engine, segments, chunk_size)
    del engine
    _free_memory()
    log.info(
        "reference: %d segments, %d predicted tokens, ppl %.3f, %.1f s",
        *(len(segments), len(ref.languages), perplexity(ref.nll), time.perf_counter() - start),
    )
    for config in configs:
        start = time.perf_counter()
        engine = build(config)
        scores = score_segments(engine, segments, chunk_size)
        del engine
        _free_memory()
        log.info("%s: %.1f s", config, time.perf_counter() - start)
        if config != REFERENCE and torch.equal(scores.nll, ref.nll):
            log.warning("%s scores exactly as the reference: is its quantization applied?", config)
        yield compare(config, scores, ref)
