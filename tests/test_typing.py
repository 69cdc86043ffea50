"""The public API's type hints, checked by mypy as a user's type checker sees them.

One mypy run (it takes ~20-30 s) over:
  * the public modules in TYPED, with every function annotated (disallow_untyped_defs) and no errors;
  * a user's script (USES) whose `assert_type`s pin what `load` and the LLM methods return for each
    argument combination (the overloads);
  * a script of mistakes (MISTAKES) where each line marked `# error` must be reported, so the check
    is shown to fail when a type is wrong.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api")

SRC = Path(__file__).resolve().parents[1] / "src"
TYPED = ["ember/__init__.py", "ember/api.py", "ember/errors.py", "ember/hub.py", "ember/tokenizer.py",
         "ember/varbuilder.py", "ember/generation/results.py", "ember/generation/defaults.py"]

USES = '''
from typing import Iterator
from typing_extensions import assert_type

import ember
from ember.generation.results import Chunk, Completion

llm = ember.load("smollm2", task="generate")
assert_type(llm, ember.LLM)
assert_type(llm.generate("hi"), str)
assert_type(llm.generate([[1, 2], [3]]), list[str])
assert_type(llm.generate(["a", "b"], details=True), list[Completion])
assert_type(llm.generate("hi", 8, details=True), Completion)
assert_type(llm.stream("hi"), Iterator[str])
assert_type(llm.stream("hi", details=True), Iterator[Chunk])
assert_type(llm.chat([{"role": "user", "content": "x"}]), str)
assert_type(llm.chat([{"role": "user", "content": "x"}], details=True), Completion)
assert_type(llm.chat([{"role": "user", "content": "x"}], stream=True), Iterator[str])
assert_type(llm.chat([{"role": "user", "content": "x"}], stream=True, details=True), Iterator[Chunk])
assert_type(ember.load("minilm", task="embed"), ember.Embedder)
assert_type(ember.load("t5", task="text2text"), ember.Seq2SeqLM)
assert_type(ember.load("whisper", task="transcribe"), ember.Transcriber)
assert_type(ember.load("clip", task="image-text"), ember.ImageTextEmbedder)
any_model = ember.load("smollm2")
if isinstance(any_model, ember.LLM):
    assert_type(any_model.generate("x"), str)
vb = ember.VarBuilder.from_mmaped_safetensors("model.safetensors")
w = vb.pp("model").get((4, 4), "embed_tokens.weight")
assert_type(w.shape[0], int)
'''

MISTAKES = '''
import ember

llm = ember.load("smollm2", task="generate")
n: int = llm.generate("hi")  # error
texts: list[str] = llm.generate("hi", details=True)  # error
emb = ember.load("minilm", task="embed")
emb.generate("hi")  # error
ember.load("smollm2", task="classify")  # error
ember.load("smollm2").generate("hi")  # error
'''


def test_public_api_types_check(tmp_path):
    uses, mistakes = tmp_path / "uses.py", tmp_path / "mistakes.py"
    uses.write_text(USES)
    mistakes.write_text(MISTAKES.lstrip("\n"))
    files = [str(SRC / f) for f in TYPED] + [str(uses), str(mistakes)]
    out, err, _ = api.run(["--config-file", str(SRC.parent / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache"),
                           "--disallow-untyped-defs", "--disallow-incomplete-defs", "--follow-imports=silent",
                           "--no-error-summary", "--hide-error-context", *files])
    assert not err, err
    errors = [line for line in out.splitlines() if ": error:" in line]
    outside = [e for e in errors if not e.startswith(str(mistakes))]
    assert not outside, "\n".join(outside)
    want = {i for i, line in enumerate(MISTAKES.lstrip("\n").splitlines(), 1) if line.endswith("# error")}
    got = {int(m.group(1)) for e in errors if (m := re.match(re.escape(str(mistakes)) + r":(\d+):", e))}
    assert got == want, f"mypy flagged lines {sorted(got)} of the mistakes, expected {sorted(want)}:\n{out}"
