"""One rank of the tensor-parallel tests (tests/test_tensor_parallel.py starts two of these with
torchrun's environment variables set, as torchrun would).

    python tests/tpworker.py SPEC.json OUT_DIR

For every model of SPEC: logits, greedy and sampled tokens, weight bytes (OUT_DIR/rankN.pt). Then
rank 1 dies (exit code 3) and rank 0 reports what its next generation got (OUT_DIR/killed.json).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

import ember


def ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def tokens(llm, prompt, n: int = 12, **kw) -> list[int]:
    return [ev.token_id for ev in llm.events([llm.request(prompt, n, ignore_eos=True, **kw)]) if ev.token_id is not None]


def weight_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers (quantised weights are buffers)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def main(spec_file: str, out: str) -> None:
    rank = int(os.environ["RANK"])
    results = {}
    for name, (folder, kw) in json.loads(open(spec_file).read()).items():
        llm = ember.load(folder, tp=2, dtype=torch.float32, **kw)
        vocab = llm.config.vocab_size
        with torch.no_grad():
            logits = llm.model(ids(vocab))
        # rank 1 asks for another prompt: rank 0's is the one every rank runs
        prompt = [3, 5, 7, 11, 13] if rank == 0 else [1, 2]
        results[name] = {"logits": logits, "greedy": tokens(llm, prompt),
                         "sampled": tokens(llm, prompt, temperature=1.0),  # no seed: rank 0 picks one for all
                         "bytes": weight_bytes(llm.model)}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    if rank == 1:
        os._exit(3)  # a rank that dies mid-run
    t0 = time.monotonic()
    try:
        tokens(llm, [3, 4, 5], 50)
        what = "no error"
    except ember.EmberError as e:
        what = f"{type(e).__name__}: {e}"
    with open(os.path.join(out, "killed.json"), "w") as f:
        json.dump({"error": what, "seconds": time.monotonic() - t0}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
