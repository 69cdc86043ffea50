"""Speculative decoding against plain decoding, in the same run: a code-editing chat prompt (the reply
copies the code it is given, or not: the small model often explains instead) and the same edit
as a completion whose continuation is the code, greedy, plain first, then prompt lookup (n-gram drafting)
and, with --assistant, a draft model. Prints tokens/s, the acceptance rate (accepted / drafted
tokens), tokens per verifying forward, the speed-up over plain decoding, and whether the text is
the same (it must be: greedy speculative decoding is exact).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_speculative.py [--model PATH] [--tokens 128] [--num-tokens 4]
        [--assistant PATH] [--device cpu] [--engine]

On a shared CPU keep OMP_NUM_THREADS=1 (spinning threads of an oversubscribed pool slow both
sides tenfold). Defaults to SmolLM2-135M-Instruct as float32 safetensors (the tests' conversion of the Q4_1 GGUF;
the GGUF kept packed works too, but its int8 activation blocks can make the greedy text part, see
generation/speculative.py). Issue 22's bar (on a GPU): prompt lookup
>= 1.5x plain decoding, same text.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CODE = '''def load_users(path):
    users = []
    with open(path) as f:
        for line in f:
            name, age, email = line.strip().split(",")
            users.append({"name": name, "age": int(age), "email": email})
    return users


def adults(users):
    result = []
    for user in users:
        if user["age"] >= 18:
            result.append(user)
    return result


def emails(users):
    return [user["email"] for user in users]
'''
TASK = "Rename the function `adults` to `grown_ups` everywhere in this code and give back the whole file:\n\n"


def prompts(llm) -> dict:
    """The edit as a chat request (how much the reply copies is up to the model), and as a completion
    whose continuation is the edited code itself."""
    return {"chat": llm.tokenizer.encode_chat([{"role": "user", "content": TASK + "```python\n" + CODE + "```"}],
                                              add_generation_prompt=True),
            "completion": "```python\n" + CODE + "```\n\nThe same code, with `adults` renamed to `grown_ups`:\n\n"
                          "```python\n"}


def run(llm, prompt, tokens: int, speculative=None):
    """(text, decode tokens/s, the speculator's stats) of one greedy generation."""
    req = llm.request(prompt, tokens, temperature=0)
    gen = llm.generator([req], speculative=speculative)
    out, t0, n = [], None, 0
    for ev in gen.run([req]):
        out.append(ev.text)
        n += ev.token_id is not None
        if t0 is None:  # time decoding only: from the end of the prefill step
            t0, n = time.perf_counter(), 0
    dt = time.perf_counter() - t0
    return "".join(out), n / dt, (gen.speculator.stats if gen.speculator is not None else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct, float32 (test fixture)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--num-tokens", type=int, default=4, help="tokens drafted per step")
    ap.add_argument("--ngram", type=int, default=3, help="max_matching_ngram_size")
    ap.add_argument("--assistant", default=None, help="a draft model (same tokenizer) to compare too")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--engine", action="store_true", help="through the static decode engine (CUDA graphs on GPU)")
    args = ap.parse_args()

    import ember
    from ember.generation.speculative import Speculative

    model = args.model
    if model is None:
        from models import smollm2_hf

        model = smollm2_hf()
    llm = ember.load(model, device=args.device, dtype=args.dtype, engine=args.engine or None)
    print(f"model {Path(str(model)).name} on {llm.device} ({llm.dtype}), {args.tokens} tokens, greedy")
    runs = [("plain", None),
            (f"prompt lookup k={args.num_tokens}", Speculative(prompt_lookup_num_tokens=args.num_tokens,
                                                              max_matching_ngram_size=args.ngram))]
    if args.assistant:
        draft = ember.load(args.assistant, device=llm.device, dtype=llm.dtype)
        runs.append((f"assistant k={args.num_tokens}", Speculative(assistant_model=draft,
                                                                  num_assistant_tokens=args.num_tokens)))
    print(f"{'':36} {'tok/s':>8} {'accept':>7} {'tok/fwd':>8} {'speed-up':>9}  same text")
    for kind, prompt in prompts(llm).items():
        run(llm, prompt, 8)  # warm-up
        base_text = base_tps = None
        for name, spec in runs:
            text, tps, stats = run(llm, prompt, args.tokens, spec)
            if base_text is None:
                base_text, base_tps = text, tps
            acc = f"{stats['accepted'] / max(stats['drafted'], 1):.2f}" if stats else "-"
            per = f"{stats['emitted'] / max(stats['steps'], 1):.2f}" if stats else "1.00"
            print(f"{kind + ': ' + name:36} {tps:8.1f} {acc:>7} {per:>8} {tps / base_tps:8.2f}x  {text == base_text}")
    print("(tok/fwd: tokens emitted per verifying forward, over the steps that drafted anything)")


if __name__ == "__main__":
    main()
