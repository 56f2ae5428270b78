"""Tiny random-weight checkpoints of each supported architecture, written as HF directories.

They share SmolLM2's real tokenizer (so text paths are exercised) and are small
enough that a token-exact comparison against transformers takes seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

ARCHS = ("llama", "mistral", "qwen2", "qwen3")

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
)


def tiny_config(arch: str, vocab_size: int, **overrides: object) -> transformers.PretrainedConfig:
    kwargs: dict[str, object] = dict(_COMMON, vocab_size=vocab_size)
    if arch == "llama":
        cls = transformers.LlamaConfig
        kwargs.update(
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            rope_theta=500000.0,
        )
    elif arch == "mistral":
        cls = transformers.MistralConfig
        kwargs.update(sliding_window=None, head_dim=32)
    elif arch == "qwen2":
        cls = transformers.Qwen2Config
        kwargs.update(tie_word_embeddings=False)
    elif arch == "qwen3":
        cls = transformers.Qwen3Config
        kwargs.update(head_dim=32, num_key_value_heads=1)
    else:
        raise ValueError(arch)
    kwargs.update(overrides)
    return cls(**kwargs)


def write_tiny_model(arch: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and the tokenizer of a random `arch` model."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_config(arch, vocab_size=len(tokenizer))
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init at std 0.02 gives near-uniform logits; larger weights give a model
    # whose greedy choices are decisive, like a trained one.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.8, 1.2)
            elif param.dim() == 2:
                param.normal_(0.0, 1.0 / param.shape[-1] ** 0.5)
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
