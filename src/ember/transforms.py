"""Backend transforms: named steps the loading pipeline applies, in order, to a built model.

Layers are built plain from the checkpoint (`ember.nn`); what a backend wants of them (oneDNN's
prepacked weight layout now; quantising and sharding in coming work) is done here, after the
build, never from inside a layer's constructor. Each step rewrites the module tree in place and
says how many modules it changed; `Loaded.transforms` records the steps that ran.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Transform:
    name: str
    apply: Callable[[nn.Module], int]  # rewrites the model in place; returns how many modules changed
    why: str = ""


def _prepack(model: nn.Module) -> int:
    from .backends.onednn import prepack_all

    return prepack_all(model)


PREPACK = Transform("prepack", _prepack, "oneDNN blocked-layout bf16 weights (CPU with native bf16)")


def plan(task: str, dtype: torch.dtype, device: torch.device, *, prepack: bool | None = None) -> list[Transform]:
    """The steps for a model of `task` computing in `dtype` on `device`.

    prepack: oneDNN-prepacked bf16 Linears on CPU. None = on where the CPU has native bf16 (the
    backend checks); False when the model will be torch.compile'd (Inductor prepacks itself).
    """
    steps = []
    if prepack is not False and device.type == "cpu" and dtype == torch.bfloat16 and task in ("causal-lm", "encoder"):
        steps.append(PREPACK)
    return steps


def apply(model: nn.Module, steps: list[Transform]) -> list[str]:
    """Run `steps` in order; the names of those that changed something."""
    done = []
    for step in steps:
        if step.apply(model):
            done.append(step.name)
    return done
