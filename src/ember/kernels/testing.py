"""Random but valid ggml blocks, for tests and benchmarks.

Every bit pattern of a block's code bytes is a valid weight, so blocks are random bytes with their
fp16 scale fields overwritten by finite values (about the size real checkpoints have).
"""
from __future__ import annotations

import torch

from ember.io import ggml

# byte offsets of each type's fp16 fields: (scale, min-or-None)
F16_FIELDS = {
    ggml.Q4_0: (0,), ggml.Q4_1: (0, 2), ggml.Q5_0: (0,), ggml.Q5_1: (0, 2), ggml.Q8_0: (0,),
    ggml.Q4_K: (0, 2), ggml.Q5_K: (0, 2), ggml.Q6_K: (208,),
}


def random_blocks(ggml_type: int, n: int, k: int, generator: torch.Generator | None = None,
                  scale: float = 0.01) -> torch.Tensor:
    """uint8 [n, row_bytes] of random valid blocks for an [n, k] weight."""
    elems, nbytes = ggml.block_size(ggml_type)
    assert k % elems == 0, (k, elems)
    nb = n * (k // elems)
    data = torch.randint(0, 256, (nb, nbytes), dtype=torch.uint8, generator=generator)
    for at in F16_FIELDS[ggml_type]:
        v = ((torch.rand(nb, generator=generator) * 0.9 + 0.1) * scale).to(torch.float16)
        data[:, at:at + 2] = v.view(torch.uint8).reshape(nb, 2)
    return data.reshape(n, -1)
