"""The README's Python snippets that say they run as written with no Hub access do (slow: they use
the real short-name models, from the fixtures' cache)."""
import os
import re
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MARK = "runs as written with no Hugging Face Hub access"


def offline_snippets() -> list[str]:
    text = README.read_text()
    out = []
    for m in re.finditer(r"```python\n(.*?)```", text, re.S):
        before = text[max(0, m.start() - 300):m.start()]
        if MARK in " ".join(before.split()):
            out.append(m.group(1))
    return out


def test_the_readme_marks_its_offline_snippets():
    assert len(offline_snippets()) >= 2  # the Python API and the embeddings snippets


@pytest.mark.slow
@pytest.mark.parametrize("i", range(2))
def test_offline_readme_snippets_run(i, smollm2_gguf, tmp_path, monkeypatch):
    import realmodels
    from ember import fixtures
    from ember.kernels import _build

    # the short names' cache, filled from the test fixtures' copies (symlinks: nothing is downloaded)
    cache = tmp_path / "ember"
    for known, src in ((fixtures.known_model("smollm2"), smollm2_gguf),
                       (fixtures.known_model("minilm"), realmodels.minilm_dir())):
        monkeypatch.setenv("EMBER_CACHE", str(cache))
        dst = known.path()
        dst.parent.mkdir(parents=True, exist_ok=True)
        if known.folder:  # (copied: module paths that lead outside the folder are refused)
            shutil.copytree(src, dst)
            (dst / ".complete").write_text("test")
        else:
            os.symlink(src, dst)
    monkeypatch.setenv("EMBER_KERNELS_CACHE", str(_build.cache_dir().parent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub-cache"))
    code = offline_snippets()[i].replace(": ...", ": pass")
    exec(compile(code, f"README snippet {i}", "exec"), {})
