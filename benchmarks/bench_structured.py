"""Decode throughput with `json_schema` (constrained decoding) vs free decoding, in the same batch.

One generator of B slots decodes N tokens per row, three ways in the same run: every row free, half
the rows under a JSON schema (constrained and free rows share each forward), every row constrained.
The schema (an array of at least 1000 objects) cannot be completed within N tokens, so constrained
rows run their full length like the free ones; the grammar's work per token is the real one (object
keys, strings, numbers, separators). Prints tokens/s, the ratio to the all-free batch (issue 16's
target: >= 0.9x) and the share of the time spent in the grammar's own work (masks, advances): on a
shared machine the ratio is noisy, the share is not.

    PYTHONPATH=src python benchmarks/bench_structured.py [--model PATH] [--batch 4] [--tokens 64] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

SCHEMA = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                     "count": {"type": "integer", "minimum": 0, "maximum": 9999},
                                     "tag": {"enum": ["alpha", "beta", "gamma"]}},
    "required": ["name", "count", "tag"], "additionalProperties": False}}
PROMPT = "List some inventory items as JSON:"


def run(llm, batch: int, tokens: int, constrained: int, grammar) -> tuple[float, int]:
    reqs = [llm.request(PROMPT, tokens, ignore_eos=True, grammar=grammar if i < constrained else None)
            for i in range(batch)]
    gen = llm.generator(reqs, max_batch=batch)
    n, t_first = 0, None
    for ev in gen.run(reqs):
        if ev.token_id is not None:
            n += 1
            if t_first is None and n >= batch:  # time decoding only: from the end of the prefill step
                t_first, n = time.perf_counter(), 0
    return n / (time.perf_counter() - t_first), n


class _Timed:
    """Wall time spent inside the grammar's functions (the masks and the token advances)."""

    def __init__(self):
        from ember.generation import grammar

        self.total, self.g = 0.0, grammar
        self.orig = (grammar.mask_logits, grammar.Matcher.advance)

        def mask_logits(*a, **k):
            t = time.perf_counter()
            try:
                return self.orig[0](*a, **k)
            finally:
                self.total += time.perf_counter() - t

        def advance(m, tok):
            t = time.perf_counter()
            try:
                return self.orig[1](m, tok)
            finally:
                self.total += time.perf_counter() - t

        grammar.mask_logits, grammar.Matcher.advance = mask_logits, advance


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the default chat model (SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import ember
    from ember.fixtures import default_model

    llm = ember.load(args.model or default_model(), device=args.device)
    grammar = llm.grammar(json_schema=SCHEMA)
    run(llm, args.batch, 4, args.batch, grammar)  # warm-up (kernels, the llguidance tokenizer)
    print(f"{llm!r}: batch {args.batch}, {args.tokens} tokens per row")
    base = None
    timed = _Timed()
    for label, k in (("all free", 0), ("half json_schema", args.batch // 2), ("all json_schema", args.batch)):
        timed.total = 0.0
        t = time.perf_counter()
        best = max(run(llm, args.batch, args.tokens, k, grammar)[0] for _ in range(args.repeats))
        share = timed.total / (time.perf_counter() - t)
        base = base or best
        print(f"  {label:18s} {best:8.1f} tok/s   {best / base:5.2f}x free   grammar work {100 * share:4.1f}% of the time")


if __name__ == "__main__":
    main()
