"""What `quantize="int8"` / `"int4"` costs in quality: perplexity on a fixed text against the
unquantised model, and greedy agreement (the share of generated tokens equal to the unquantised
model's, up to the first difference and overall).

    python benchmarks/quantize_quality.py                 # SmolLM2-135M-Instruct bf16 (benchmarks/models.py)
    python benchmarks/quantize_quality.py path/to/model --tokens 64
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# A fixed text: the Apache License 2.0's definitions section (public, stable, ordinary English prose).
TEXT = """"License" shall mean the terms and conditions for use, reproduction, and distribution as defined by
Sections 1 through 9 of this document. "Licensor" shall mean the copyright owner or entity authorized by
the copyright owner that is granting the License. "Legal Entity" shall mean the union of the acting entity
and all other entities that control, are controlled by, or are under common control with that entity. For
the purposes of this definition, "control" means (i) the power, direct or indirect, to cause the direction
or management of such entity, whether by contract or otherwise, or (ii) ownership of fifty percent (50%) or
more of the outstanding shares, or (iii) beneficial ownership of such entity. "You" (or "Your") shall mean
an individual or Legal Entity exercising permissions granted by this License. "Source" form shall mean the
preferred form for making modifications, including but not limited to software source code, documentation
source, and configuration files. "Object" form shall mean any form resulting from mechanical transformation
or translation of a Source form, including but not limited to compiled object code, generated
documentation, and conversions to other media types."""
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are"]


def perplexity(llm, ids: list[int]) -> float:
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids])).float()[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(nll.item())


def greedy(llm, prompt: str, n: int) -> list[int]:
    return [ev.token_id for ev in llm.events([llm.request(prompt, n, ignore_eos=True)])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import ember

    if a.model is None:
        sys.path.insert(0, str(HERE))
        import models

        a.model = str(models.smollm2_hf_bf16())
    ref = ember.load(a.model, dtype=torch.float32)
    ids = ref.encode(TEXT)
    base_ppl = perplexity(ref, ids)
    want = {p: greedy(ref, p, a.tokens) for p in PROMPTS}
    bf16_ppl = perplexity(ember.load(a.model, dtype=torch.bfloat16), ids)
    print(f"{a.model}: {len(ids)} tokens of text; float32 perplexity {base_ppl:.3f}, bf16 {bf16_ppl:.3f}")
    for mode in ("int8", "int4"):
        q = ember.load(a.model, quantize=mode)
        ppl = perplexity(q, ids)
        same = total = prefix = 0
        for p in PROMPTS:
            got = greedy(q, p, a.tokens)
            total += len(got)
            same += sum(x == y for x, y in zip(got, want[p]))
            k = next((i for i, (x, y) in enumerate(zip(got, want[p])) if x != y), len(got))
            prefix += k
        print(f"quantize={mode}: perplexity {ppl:.3f} ({100 * (ppl / bf16_ppl - 1):+.2f}% vs bf16, "
              f"{100 * (ppl / base_ppl - 1):+.2f}% vs float32); greedy tokens vs float32 "
              f"equal {same}/{total} ({100 * same / total:.0f}%), identical prefix {prefix / len(PROMPTS):.1f} of "
              f"{a.tokens} on average")
    return 0


if __name__ == "__main__":
    sys.exit(main())
