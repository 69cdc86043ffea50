"""Which grammar library ember's constrained decoding uses: xgrammar vs llguidance, measured here.

For each tokenizer (the default model's 49k vocabulary, Qwen2.5's 151k) and a nested JSON schema:
the tokenizer setup time, the schema's compile time, and the per-token cost of computing the
next-token mask (walking the tokens of a valid instance, one mask per token, as decoding does).

    PYTHONPATH=src python benchmarks/bench_grammar_libs.py [--gguf PATH ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "tags", "address", "score"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada Lovelace, who wrote the first published algorithm for Babbage's Analytical Engine in 1843 "
                    "and saw that such a machine could do more than arithmetic.", "age": 36, "tags": ["red", "blue", "green", "red"],
            "address": {"city": "London", "zip": "W1 4AB"}, "score": 0.875}


def tokenizer_of(path: str):
    from ember.gguf_tokenizer import tokenizer_from_gguf
    from ember.io.gguf import GGUFFile

    return tokenizer_from_gguf(GGUFFile(path).metadata, path=path)


def bench_llguidance(tok, ids, vocab, eos):
    import llguidance
    import llguidance.torch as lt

    t = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.tk.to_str(), n_vocab=vocab, eos_token=eos)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    m = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t
    assert not m.is_error(), m.get_error()
    mask = lt.allocate_token_bitmask(1, vocab)
    times = []
    for tid in ids:
        t = time.perf_counter()
        lt.fill_next_token_bitmask(m, mask, 0)
        times.append(time.perf_counter() - t)
        assert m.consume_token(tid), m.get_error()
    return setup, compile_s, times


def bench_xgrammar(tok, ids, vocab, eos):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    t = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.tk)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    m = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t
    mask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for tid in ids:
        t = time.perf_counter()
        m.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - t)
        assert m.accept_token(tid)
    return setup, compile_s, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", nargs="*", default=None)
    args = ap.parse_args()
    paths = args.gguf
    if paths is None:
        from ember.fixtures import default_model

        paths = [str(default_model())]
        qwen = Path.home() / ".cache/ember-fixtures/qwen25/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
        if qwen.exists():
            paths.append(str(qwen))
    text = json.dumps(INSTANCE, separators=(",", ":"))
    print("measured under contention (shared CPU); ms per next-token mask")
    for path in paths:
        tok = tokenizer_of(path)
        vocab = tok.tk.get_vocab_size(with_added_tokens=True)
        eos = tok.eos_token_id if tok.eos_token_id is not None else 0
        ids = tok.encode(text, add_special_tokens=False)
        print(f"\n{Path(path).name}: vocab {vocab}, {len(ids)} tokens of JSON")
        res = {}
        for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
            try:
                setup, comp, times = fn(tok, ids, vocab, eos)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  {name}: failed: {type(e).__name__}: {e}")
                continue
            med = statistics.median(times) * 1e3
            p90 = sorted(times)[int(0.9 * (len(times) - 1))] * 1e3
            mean = statistics.fmean(times) * 1e3
            res[name] = mean
            print(f"  {name:10s} tokenizer setup {setup:6.2f}s  compile {comp * 1e3:7.1f}ms  "
                  f"mask mean {mean:6.3f}, median {med:6.3f}, p90 {p90:6.3f} ms")
        if len(res) == 2:
            print(f"  llguidance / xgrammar mean mask time: {res['llguidance'] / res['xgrammar']:.2f}x")


if __name__ == "__main__":
    main()
