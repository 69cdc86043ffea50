"""Tensor parallelism over `torch.distributed` (NCCL on GPUs, gloo on CPU), launched by torchrun.

One model runs split over N processes ("ranks"), after Megatron-LM's layout as Candle's
llama_multiprocess and transformers' `tp_plan` use it:

- attention: q/k/v column-parallel (each rank holds whole heads: H/N query heads, KV/N key/value heads,
  or one replicated KV head when there are fewer than N), o_proj row-parallel;
- MLP: gate/up column-parallel, down row-parallel; MoE: every expert's intermediate dim split;
- one all-reduce per row-parallel layer (the attention output and the MLP output of each block);
- embedding vocab-parallel (rows split, lookups outside a rank's rows are zeros, then all-reduced),
  LM head vocab-parallel with the logits all-gathered, so every rank holds the same full logits.

A layer reads only its rank's slice of each tensor from the checkpoint (`VarBuilder.sharded`), so a
rank's weight memory is about 1/N. Model files ask the builder's `tp` (a `TensorParallel`) how to
split; with `tp` None the same code builds the whole model.

    torchrun --nproc-per-node 2 script.py      # script.py: llm = ember.load(model, tp=2); print(llm.generate(...))
    ember run MODEL "prompt" --tp 2            # the CLI starts the processes itself

Generation is SPMD: every rank runs the same steps; rank 0's request (prompt ids, sampling options,
a seed) is broadcast, and the gathered logits are identical on every rank, so every rank samples the
same token. Under `ember serve --tp N` rank 0's scheduler drives and the other ranks replay its
generator calls (`steps.LeaderGenerator`, `steps.follow`).
"""
from .group import TensorParallel, init_tensor_parallel

__all__ = ["TensorParallel", "init_tensor_parallel"]
