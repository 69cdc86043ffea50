"""Checkpoint readers: safetensors (mmap, validated headers) and GGUF."""
