"""Keeping the ranks of a split model in step: rank 0 drives, the others follow its requests."""
from __future__ import annotations

import dataclasses
import random

from ..generation.loop import Request
from .group import TensorParallel


def follow_rank0(tp: TensorParallel, req: Request) -> Request:
    """Rank 0's request (prompt ids, limits, sampling options) on every rank, with a seed chosen by
    rank 0 when sampling has none: the gathered logits are the same on every rank, so with the same
    inputs and seed every rank picks the same tokens and runs the same steps."""
    if tp.rank == 0 and req.sampling.temperature > 0 and req.sampling.seed is None:
        req = dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, seed=random.getrandbits(63)))
    sent = tp.broadcast_object(req)
    return dataclasses.replace(sent, id=req.id)  # ids stay this process's own
