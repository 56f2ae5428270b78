"""Model sources (local dir, hub id, GGUF) and our own Llama-family implementation."""
