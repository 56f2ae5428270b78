"""Engine: the step loop (schedule → run → sample → apply) and a vLLM-like `generate` API.

The step API (`add_request`, `abort_request`, `step`) is what the worker's
engine thread drives; `generate` drives it to completion in-process.

NOTE: ~370 lines: the step loop and its failure isolation share the engine's state;
the batch driver (batch.py), the fold (output.py) and isolation.py are already apart.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig

from ops.device import default_device
from worker.config import EngineConfig
from worker.engine import isolation
from worker.engine.batch import run_to_completion
from worker.engine.block_allocator import BlockAllocator
from worker.engine.calibrate import feed_text
from worker.engine.cuda_graphs import bucket_sizes
from worker.engine.length_predictor import LengthPredictor
from worker.engine.model_runner import ModelRunner
from worker.engine.sampler import Sampler, SamplerOutput
from worker.engine.scheduler import ScheduledChunk, Scheduler
from worker.engine.sequence import Request, Sequence, TokenOutput
from worker.errors import RequestError
from worker.models.loader import load_hf_config, load_model
from worker.models.source import resolve_model
from worker.params import SamplingParams

log = logging.getLogger(__name__)

# What a step's forward pass and sampling give: the sampled sequences and their tokens.
_StepResult = tuple[list[Sequence], SamplerOutput]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    num_preemptions: int  # cumulative since start
    num_batched_tokens: int  # prefill + decode tokens in the last step's forward pass
    # Prefix cache, cumulative since start, counted at each admission (a resumed sequence
    # counts again): tokens to prefill, and those of them found in cached pages.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_cached_blocks: int = 0  # pages findable by their tokens now (in use or free)
    # Cumulative since start: tokens prefilled again when preempted sequences came back (prompt
    # + output so far, less what the prefix cache still held): the work preemption wasted.
    num_recomputed_tokens: int = 0

    @property
    def prefix_cache_hit_ratio(self) -> float:
        """Prompt tokens served from the cache / prompt tokens (0.0 before any request)."""
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )


class Engine:
    """Continuous-batching inference over a paged KV cache.

    Args:
        config: the whole engine config; the model is resolved and loaded here.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        model_dir = resolve_model(config.model.source)
        hf_config = load_hf_config(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_model_len = _max_model_len(hf_config, config.model.max_model_len)
        self.eos_token_ids = _eos_token_ids(model_dir, hf_config, self.tokenizer)
        self.device = default_device()
        dtype = _DTYPES[config.model.dtype]
        model = load_model(
            model_dir,
            dtype,
            self.device,
            self.max_model_len,
            config.model.quantization,
            feed=feed_text,
        )
        self.vocab_size = model.args.vocab_size
        self.runner = ModelRunner(model, config.cache, dtype, self.device)
        self._enable_decode_graphs(config)
        self.allocator = BlockAllocator(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        # Learns output lengths from every finished request; used under predicted admission.
        self.predictor = LengthPredictor()
        self.scheduler = Scheduler(config.scheduler, self.allocator, self.predictor)
        self.sampler = Sampler(self.vocab_size, seed=config.seed)
        self._seqs: dict[str, Sequence] = {}
        self._aborted: list[TokenOutput] = []
        self._last_batched_tokens = 0
        # What exists now (the model, torch's and transformers' module state) lives as long
        # as the process: moved out of the collector's generations, it is not traversed again
        # by every full collection the step loop's allocations trigger (~3-5% of a decode
        # step's time in a profile before this; vLLM freezes after start-up too). Unfrozen
        # first: a process that builds engines one after another (tests, bench comparisons)
        # gets the reference cycles of the ones it dropped collected here, not kept for good.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        log.info(
            "engine ready: %s (%s, %s), max_model_len=%d, KV capacity %d tokens",
            model_dir.name,
            model.args.model_type,
            config.model.dtype,
            self.max_model_len,
            self.runner.capacity_tokens,
        )

    def _enable_decode_graphs(self, config: EngineConfig) -> None:
        """Capture CUDA graphs of decode-only steps, on CUDA unless `enforce_eager`."""
        if config.enforce_eager:
            log.info("CUDA graphs: off (--enforce-eager)")
        elif self.device.type != "cuda":
            log.info("CUDA graphs: off on %s (every step runs eagerly)", self.device.type)
        else:
            buckets = bucket_sizes(config.scheduler.max_num_seqs)
            self.runner.enable_decode_graphs(buckets, self.max_model_len)

    # -- step-level API -------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a tokenized request; it joins the running batch at the next step.

        Raises:
            RequestError: empty prompt, prompt too long, a token id outside the vocabulary
                (prompt or stop_token_ids), or an id already running.
        """
        num_prompt = len(request.prompt_token_ids)
        if num_prompt == 0:
            raise RequestError("empty_prompt", "the prompt has no tokens")
        limit = min(self.max_model_len, self.runner.capacity_tokens)
        if num_prompt >= limit:
            raise RequestError(
                "prompt_too_long",
                f"prompt has {num_prompt} tokens; the limit is {limit - 1} "
                f"(context length {self.max_model_len}, KV capacity {self.runner.capacity_tokens})",
            )
        if request.request_id in self._seqs:
            raise RequestError(
                "invalid_request", f"request id {request.request_id!r} is already running"
            )
        if any(t < 0 or t >= self.vocab_size for t in request.prompt_token_ids):
            raise RequestError(
                "invalid_request", f"prompt token ids must be in [0, {self.vocab_size})"
            )
        request.params.check_vocab(self.vocab_size)
        seq = Sequence(request)
        self._seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str, reason: str = "abort") -> None:
        """Finish a request now and free its KV pages; the next `step()` reports it."""
        seq = self._seqs.pop(request_id, None)
        if seq is None or seq.is_finished:
            return
        self.scheduler.finish(seq, reason)
        self._aborted.append(_final_output(seq, reason))

    def has_unfinished_requests(self) -> bool:
        return bool(self._aborted) or self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_free_blocks=self.allocator.num_free_blocks,
            num_total_blocks=self.allocator.num_blocks,
            block_size=self.allocator.block_size,
            num_preemptions=self.scheduler.num_preemptions,
            num_batched_tokens=self._last_batched_tokens,
            prefix_cache_queries=self.scheduler.num_prefix_query_tokens,
            prefix_cache_hits=self.scheduler.num_prefix_hit_tokens,
            num_cached_blocks=self.allocator.num_cached_blocks,
            num_recomputed_tokens=self.scheduler.num_recomputed_tokens,
        )

    def warm_up(self) -> None:
        """Run one short greedy request (a prefill, then a decode step) before serving.

        A process's first steps pay for what torch and the kernels set up lazily and for
        the first touch of buffers: without this a worker's first jobs waited ~0.35 s
        longer (`headrace bench e2e`, TTFT p50 0.96 -> 0.72 s). Greedy, so the seeded
        sampler's stream is untouched; the scheduler's counters start from zero again and the
        length predictor forgets this request.
        """
        if self.has_unfinished_requests():
            raise RuntimeError("warm_up() runs before the first request")
        prompt = tuple(range(min(8, self.vocab_size)))
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        self.generate([Request("warm-up", prompt, params)])
        self.scheduler.reset_counters()
        self.predictor.clear()

    def step(self) -> list[TokenOutput]:
        """Schedule, run one forward pass, sample, and apply the new tokens.

        A step that raises is retried on halves of its batch (`isolation.bisect`); the
        requests it still raises for alone finish with an `internal` error, the rest go on.
        """
        outputs, self._aborted = self._aborted, []
        plan = self.scheduler.schedule()
        self._last_batched_tokens = plan.num_batched_tokens
        for seq in plan.finished:
            self._seqs.pop(seq.request_id, None)
            outputs.append(_final_output(seq, "length"))
        if plan.chunks:
            try:
                result = self._forward(plan.chunks)
            except Exception as exc:
                self._isolate(plan.chunks, exc, outputs)
            else:
                self._commit(plan.chunks, result, outputs)
        return outputs

    def _forward(self, chunks: Seq[ScheduledChunk]) -> _StepResult:
        """Forward pass and sampling; writes only KV slots past each sequence's computed tokens,
        so a raise here leaves every sequence as it was (its chunk runs again)."""
        logits, sampled = self.runner.execute(chunks)
        seqs = [c.seq for c in sampled]
        return seqs, self.sampler(logits, seqs, self.eos_token_ids)

    def _commit(
        self, chunks: Seq[ScheduledChunk], result: _StepResult, outputs: list[TokenOutput]
    ) -> None:
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_new_tokens
        seqs, sampled = result
        for seq, token, logprobs in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
            try:
                outputs.append(self._append_token(seq, token, logprobs))
            except Exception as exc:  # stop handling failed for this request only
                log.error("applying a token to %s failed", seq.request_id, exc_info=exc)
                outputs.append(self._fail(seq, exc))

    def _isolate(
        self, chunks: Seq[ScheduledChunk], error: Exception, outputs: list[TokenOutput]
    ) -> None:
        """The step raised `error`: run the parts of the batch that do not raise, fail the rest."""
        log.error("engine step of %d requests failed; isolating", len(chunks), exc_info=error)
        blamed = isolation.bisect(
            chunks,
            error,
            self._forward,
            lambda group, result: self._commit(group, result, outputs),
            isolation.max_runs(len(chunks)),
        )
        logged = {id(error)}
        for chunk, exc in blamed:
            # Each distinct exception's traceback once: a batch-wide failure blames many.
            first = id(exc) not in logged
            logged.add(id(exc))
            log.error("failing %s: %r", chunk.seq.request_id, exc, exc_info=exc if first else None)
            outputs.append(self._fail(chunk.seq, exc))

    def _fail(self, seq: Sequence, exc: Exception) -> TokenOutput:
        """Finish `seq` with an internal error; the client sees the exception type, the log the rest."""
        self._seqs.pop(seq.request_id, None)
        self.scheduler.finish(seq, "error")
        error = RequestError(
            "internal", f"the engine failed on this request ({type(exc).__name__})"
        )
        return TokenOutput(
            seq.request_id, (), "error", error=error, num_prompt_tokens=seq.num_prompt_tokens
        )

    def _append_token(self, seq: Sequence, token: int, logprobs: Any) -> TokenOutput:
        seq.output_token_ids.append(token)
        reason = self._stop_reason(seq, token)
        if reason is not None:
            # Only natural ends teach the predictor (not aborts, errors or a too-small pool).
            self.predictor.observe(seq.num_prompt_tokens, seq.params, seq.num_output_tokens)
            self.scheduler.finish(seq, reason)
            self._seqs.pop(seq.request_id, None)
        return TokenOutput(
            seq.request_id,
            (token,),
            reason,
            logprobs=(logprobs,) if logprobs is not None else (),
            num_prompt_tokens=seq.num_prompt_tokens,
        )

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if token in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # -- scoring -----------------------------------------------------------------

    @torch.inference_mode()
    def score(self, token_ids: list[int], chunk_size: int = 256) -> torch.Tensor:
        """Teacher-forced logits of every position: [len(token_ids), vocab] float32.

        The text runs as consecutive prefill chunks through the paged cache, so every chunk
        attends to the cached (with an int8 cache: quantized) prefix, as served requests
        do. Needs an idle engine and a KV cache that holds the whole text.
        """
        if self.has_unfinished_requests():
            raise RuntimeError("score() needs an idle engine")
        if not token_ids or len(token_ids) > min(self.max_model_len, self.runner.capacity_tokens):
            raise ValueError(f"score() takes 1..{self.max_model_len} tokens")
        seq = Sequence(Request("__score__", tuple(token_ids), SamplingParams(max_tokens=1)))
        seq.block_ids = self.allocator.allocate(self.allocator.blocks_for(len(token_ids)))
        rows = []
        try:
            while seq.num_computed_tokens < len(token_ids):
                n = min(chunk_size, len(token_ids) - seq.num_computed_tokens)
                step, _ = self.runner.execute([ScheduledChunk(seq, n)], all_logits=True)
                logits = step.full()
                rows.append(logits.float())
                seq.num_computed_tokens += n
        finally:
            self.allocator.free(seq.block_ids)
        return torch.cat(rows)

    # -- whole-batch API --------------------------------------------------------

    def generate(self, items: Iterable[dict[str, Any] | Request]) -> list:
        """Run every item to completion and return one Completion each, in input order.

        Dict items use the JSONL line format (`id`, `prompt` | `messages` |
        `prompt_token_ids`, optional params); a bad item, or one the engine fails on,
        gets a Completion with `error` set and `finish_reason="error"`, the rest still run.
        """
        return run_to_completion(self, list(items))


def _final_output(seq: Sequence, reason: str) -> TokenOutput:
    """A request that ends without a new token (aborted, or too long for the KV pool)."""
    return TokenOutput(seq.request_id, (), reason, num_prompt_tokens=seq.num_prompt_tokens)


def _max_model_len(hf_config: Any, override: int | None) -> int:
    limit = int(hf_config.max_position_embeddings)
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True) is not False:
        # We attend over the full context; beyond the window that would differ from the model.
        limit = min(limit, int(window))
    if override is not None:
        if override > limit:
            raise ValueError(f"max_model_len {override} exceeds the model's {limit}")
        limit = override
    return limit


def _eos_token_ids(model_dir: Any, hf_config: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
        ids.update(_as_list(gen.eos_token_id))
    except OSError:
        pass
    ids.update(_as_list(getattr(hf_config, "eos_token_id", None)))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]
