"""The client install (`pip install headrace`: redis, msgpack, tqdm): the producer and the wire
modules load no torch, and a worker verb without the `worker` extra says what to install."""

from __future__ import annotations

import subprocess
import sys

from tests.worker_harness import REPO_ROOT

HEAVY = ("torch", "triton", "transformers")
CLIENT_MODULES = (
    "producer",
    "worker.protocol",
    "worker.keys",
    "worker.errors",
    "worker.params",
    "worker.redis_url",
    "worker.embedded",
    "worker.config",
    "worker.cli",
)

# Makes the worker extra's heavy packages unimportable, as on a client-only install.
_BLOCK = f"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {HEAVY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_the_producer_and_the_wire_modules_load_no_torch() -> None:
    imports = "; ".join(f"import {m}" for m in CLIENT_MODULES)
    code = f"import sys; {imports}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_client_verbs_run_without_the_worker_extra(redis_url: str) -> None:
    """`headrace stats` against a running stack, and the other client verbs' parsers."""
    code = _BLOCK + (
        "from worker.cli import build_parser, main\n"
        "build_parser().parse_args(['submit', 'hi'])\n"
        "build_parser().parse_args(['bulk', 'in.jsonl', '-o', 'out.jsonl'])\n"
        f"raise SystemExit(main(['stats', '--redis-url', {redis_url!r}, '--json']))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("{")


def test_a_worker_verb_without_the_worker_extra_says_what_to_install(tmp_path) -> None:
    requests = tmp_path / "in.jsonl"
    requests.write_text('{"prompt": "Hi"}\n')
    argv = ["generate", "--input", str(requests), "--output", str(tmp_path / "out.jsonl")]
    code = _BLOCK + f"from worker.cli import main\nraise SystemExit(main({argv!r}))\n"
    done = _python(code)
    assert done.returncode == 3, done.stderr
    assert "pip install 'headrace[worker]'" in done.stderr
    assert "Traceback" not in done.stderr
