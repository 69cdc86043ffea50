"""Compute backends that transforms apply to a built model (oneDNN prepacking on CPU)."""
