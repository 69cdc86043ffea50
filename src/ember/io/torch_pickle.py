"""pytorch_model.bin: read only through weights-only unpickling, and only when no safetensors exist."""
from __future__ import annotations

import os

from ..errors import CheckpointError


def read_state_dicts(paths: list[str | os.PathLike]) -> dict:
    """The tensors of every file (a sharded checkpoint's parts merged), memory-mapped where torch can."""
    import torch

    tensors: dict = {}
    for p in paths:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for hostile or corrupt files
            raise CheckpointError(f"{p}: refused or unreadable as a weights-only PyTorch checkpoint: "
                                  f"{type(e).__name__}: {str(e)[:200]}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{p}: not a state dict of tensors")
        tensors.update(sd)
    return tensors
