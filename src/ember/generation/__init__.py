"""Sampling, the generation loop, streaming detokenisation and chat templates."""
