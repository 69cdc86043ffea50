"""Sampling defaults from a model's generation_config.json, shared by the Python API and the server.

A field the caller omits takes the model's generation_config.json value (as vLLM and transformers
do); where the file is silent, the Python API is greedy and the server follows OpenAI (temperature 1).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from .sampling import SamplingParams

log = logging.getLogger("ember")

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _check(key: str, value: Any) -> Any:
    """The value as SamplingParams accepts it (raises GenerationError otherwise)."""
    return getattr(SamplingParams(**{key: value}).validate(), key)


def sampling_defaults(generation_config: dict | None, source: str = "generation_config.json",
                      check: Callable[[str, Any], Any] | None = None) -> dict:
    """The sampling fields of a generation_config (temperature, top_p, top_k, min_p, repetition_penalty).

    Each is checked as if a caller had passed it (`check(key, value)` returns the value to use or
    raises; default: what `SamplingParams.validate` accepts). One that fails is dropped with a warning
    naming it, so that calls which omit the field are never refused for a value their caller never
    sent. `do_sample` is not read (as in vLLM): a temperature in the file means sampling."""
    out = {}
    gc = generation_config if isinstance(generation_config, dict) else {}
    for k in SAMPLING_KEYS:
        v = gc.get(k)
        if v is None:
            continue
        try:
            out[k] = (check or _check)(k, v)
        except Exception as e:  # noqa: BLE001 - GenerationError, or the caller's check's own error (the server's ApiError)
            log.warning("ignoring %s's %s=%.60r: %s The default for it applies instead.", source, k, v,
                        getattr(e, "message", None) or e)
    return out
