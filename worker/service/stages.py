"""Wiring stage: the worker's stages built once, from its config and a ready engine.

Each stage gets what it talks to, and nothing else; the callbacks (`on_engine_event`,
`on_acked`, `on_change`) are how a stage tells the service that something happened.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from worker.service.engine_loop import EngineEvent, EngineLoop
from worker.service.intake import Intake
from worker.service.jobs import JobState, JobTable
from worker.service.metrics import Metrics
from worker.service.publish import Publisher
from worker.service.reader import StreamReader
from worker.service.recovery import Recovery
from worker.service.resilience import Retrier, Supervisor
from worker.service.settings import WorkerConfig
from worker.service.tokenizing import PromptEncoder

if TYPE_CHECKING:
    from worker.engine.engine import Engine


@dataclass(frozen=True)
class Stages:
    """One worker's stages (see each module), in the order a job meets them."""

    reader: StreamReader
    intake: Intake
    encoder: PromptEncoder
    engine_loop: EngineLoop
    publisher: Publisher
    recovery: Recovery
    retry: Retrier  # retries a Redis call through outages (re-creating a lost group)


def build_stages(
    cfg: WorkerConfig,
    engine: Engine,
    redis: aioredis.Redis,
    loop: asyncio.AbstractEventLoop,
    *,
    jobs: JobTable,
    metrics: Metrics,
    supervisor: Supervisor,
    closing: asyncio.Event,
    on_engine_event: Callable[[EngineEvent], None],
    on_acked: Callable[[JobState], None],
    on_change: Callable[[], None],
    engine_host: Callable[[Callable[[], None]], None] | None = None,
) -> Stages:
    """Build the stages. engine_host: where the engine loop runs (None: a thread of its own)."""
    reader = StreamReader(
        redis,
        cfg.keys,
        cfg.consumer,
        priority_aging_s=cfg.engine.scheduler.priority_aging_s,
    )
    encoder = PromptEncoder(
        engine.tokenizer,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        threads=cfg.tokenizer_threads,
    )
    recovery = Recovery(
        redis,
        cfg.keys,
        cfg.consumer,
        claim_idle_ms=cfg.claim_idle_ms,
        max_attempts=cfg.max_attempts,
        liveness_ttl_s=max(1, math.ceil(cfg.claim_idle_ms / 1000)),
        held=jobs.held_entries,
    )
    retry = Retrier(reader.ensure_group)
    publisher = Publisher(
        redis,
        cfg.keys,
        worker=cfg.consumer,
        result_ttl_s=cfg.result_ttl_s,
        reply_maxlen=cfg.reply_maxlen,
        on_acked=on_acked,
        metrics=metrics,
    )
    engine_loop = EngineLoop(engine, loop, on_engine_event, metrics, host=engine_host)
    intake = Intake(
        keys=cfg.keys,
        max_payload_bytes=cfg.max_payload_bytes,
        max_attempts=cfg.max_attempts,
        jobs=jobs,
        reader=reader,
        recovery=recovery,
        publisher=publisher,
        encoder=encoder,
        engine_loop=engine_loop,
        metrics=metrics,
        retry=retry,
        supervisor=supervisor,
        tokenizer=engine.tokenizer,
        closing=closing,
        on_change=on_change,
    )
    return Stages(reader, intake, encoder, engine_loop, publisher, recovery, retry)
